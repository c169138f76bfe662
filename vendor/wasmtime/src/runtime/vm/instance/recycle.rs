//! taskhost patch: putting a core instance back in the state its instantiation
//! left it in, without instantiating again (see `vendor/README.md` in taskhost).
//!
//! What a core instance can change after instantiation, and how each is put
//! back: its defined memories (reset to their image in place by the instance
//! allocator: the pages written are copied back from the image, the rest
//! decommitted), its defined tables (their elements as stored just after
//! instantiation, copied back), its defined globals (their raw values copied
//! back), and the lengths and bases of its runtime data segments (`data.drop`
//! zeroes a length). Its funcrefs and imports are functions of the instance and
//! its imports, which do not change. A memory or table that grew cannot shrink:
//! restoring then fails, and the caller drops the instance instead.
//!
//! What cannot be put back is refused when the snapshot is taken: a memory
//! whose initial contents were written by the startup function rather than
//! mapped from an image (segmented initialisation), shared memories, passive
//! element segments, tables of anything but funcrefs, and globals holding GC
//! references. A module's wasm `start` function is not visible here: the caller
//! must only recycle components whose core modules have none (their writes to
//! memory would not be replayed).

use super::{Instance, InstanceAllocator, InstanceLayout};
use crate::prelude::*;
use crate::runtime::vm::table::FuncTableSnapshot;
use core::pin::Pin;
use wasmtime_environ::{
    DefinedGlobalIndex, DefinedMemoryIndex, DefinedTableIndex, MemoryInitialization, Tunables,
};

/// A core instance's state just after instantiation.
pub struct CoreSnapshot {
    globals: Vec<(DefinedGlobalIndex, [u8; 16])>,
    tables: Vec<(DefinedTableIndex, FuncTableSnapshot)>,
    memories: Vec<(DefinedMemoryIndex, usize)>,
    runtime_data_lengths: Vec<u32>,
    runtime_data_bases: Vec<usize>,
}

impl Instance {
    /// Records this instance's state, or says why it cannot be put back.
    pub(crate) fn recycle_snapshot(mut self: Pin<&mut Self>) -> Result<CoreSnapshot> {
        let module = self.env_module().clone();
        if !module.passive_elements.is_empty() {
            bail!("a module has passive element segments");
        }
        let mut memories = Vec::new();
        for (index, (_, memory)) in self.memories.iter() {
            if memory.is_shared_memory() {
                bail!("a module defines a shared memory");
            }
            let memory_index = module.memory_index(index);
            match &module.memory_initialization {
                MemoryInitialization::Static { map } => {
                    if map[memory_index].is_some() && memory.needs_init() {
                        bail!("a memory's initial contents are not mapped from an image");
                    }
                }
                MemoryInitialization::Segmented => {
                    bail!("a memory is initialised by segments at instantiation");
                }
            }
            memories.push((index, memory.byte_size()));
        }
        let mut tables = Vec::new();
        for index in module
            .tables
            .keys()
            .filter_map(|i| module.defined_table_index(i))
        {
            let table = self.as_mut().get_defined_table(index);
            let Some(snapshot) = table.funcref_snapshot() else {
                bail!("a module defines a table of something other than funcrefs");
            };
            tables.push((index, snapshot));
        }
        let mut globals = Vec::new();
        for (index, global) in module.globals.iter() {
            let Some(defined) = module.defined_global_index(index) else {
                continue;
            };
            if global.wasm_ty.is_vmgcref_type() {
                bail!("a module defines a global holding a GC reference");
            }
            // SAFETY: the pointer is to this instance's own global, which is
            // 16 bytes of plain storage.
            let raw = unsafe { self.global_ptr(defined).cast::<[u8; 16]>().read() };
            globals.push((defined, raw));
        }
        let count = module.runtime_data.len();
        let offsets = self.runtime_info.offsets();
        // SAFETY: the arrays are `count` long, within this instance's vmctx.
        let (runtime_data_lengths, runtime_data_bases) = unsafe {
            let lengths: core::ptr::NonNull<u32> =
                self.vmctx_plus_offset_raw(offsets.vmctx_runtime_data_lengths_begin());
            let bases: core::ptr::NonNull<usize> =
                self.vmctx_plus_offset_raw(offsets.vmctx_runtime_data_bases_begin());
            (
                (0..count).map(|i| lengths.add(i).read()).collect(),
                (0..count).map(|i| bases.add(i).read()).collect(),
            )
        };
        Ok(CoreSnapshot {
            globals,
            tables,
            memories,
            runtime_data_lengths,
            runtime_data_bases,
        })
    }

    /// Puts back the state `snapshot` recorded.
    ///
    /// # Safety
    ///
    /// No code may be running in this instance, and `snapshot` must have been
    /// taken of this instance.
    pub(crate) unsafe fn recycle_restore(
        mut self: Pin<&mut Self>,
        snapshot: &CoreSnapshot,
        allocator: &dyn InstanceAllocator,
        tunables: &Tunables,
    ) -> Result<()> {
        let module = self.env_module().clone();
        for (index, size) in &snapshot.memories {
            let ty = &module.memories[module.memory_index(*index)];
            let memory = self.as_mut().get_defined_memory_mut(*index);
            if memory.byte_size() != *size {
                bail!("a memory grew");
            }
            // SAFETY: no code runs in this instance (this function's contract),
            // and the memory was allocated by this store's allocator.
            unsafe { allocator.reset_memory_in_place(memory, ty, tunables)? };
        }
        for (index, elements) in &snapshot.tables {
            if !self
                .as_mut()
                .get_defined_table(*index)
                .restore_funcrefs(elements)
            {
                bail!("a table grew");
            }
        }
        for (index, raw) in &snapshot.globals {
            // SAFETY: see `recycle_snapshot`.
            unsafe { self.global_ptr(*index).cast::<[u8; 16]>().write(*raw) };
        }
        let offsets = self.runtime_info.offsets();
        // SAFETY: see `recycle_snapshot`.
        unsafe {
            let lengths: core::ptr::NonNull<u32> =
                self.vmctx_plus_offset_raw(offsets.vmctx_runtime_data_lengths_begin());
            let bases: core::ptr::NonNull<usize> =
                self.vmctx_plus_offset_raw(offsets.vmctx_runtime_data_bases_begin());
            for (i, length) in snapshot.runtime_data_lengths.iter().enumerate() {
                lengths.add(i).write(*length);
            }
            for (i, base) in snapshot.runtime_data_bases.iter().enumerate() {
                bases.add(i).write(*base);
            }
        }
        Ok(())
    }
}
