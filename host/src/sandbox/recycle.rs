//! Recycling an instance: after a task that returned, its instance is put back in the state
//! its instantiation left it in (memories reset to the plugin's image, tables, globals and
//! handle tables as they were, a new store state) and serves the next task of its plugin as a
//! fresh instance would, without the cost of instantiating it again (most of a fresh
//! instance's cost for an interpreter: the Python runtime is a dozen core modules that fill a
//! table of 5,900 functions at every instantiation).
//!
//! The snapshot and the restore are the vendored wasmtime's (`Instance::pristine`,
//! `Instance::restore`: vendor/README.md). What they cannot replay is refused up front: a
//! component any of whose core modules has a `start` function (it may write memory at
//! instantiation, which a reset to the image would undo) is never recycled, and neither is an
//! instance whose snapshot wasmtime refuses (memory initialised at instantiation rather than
//! mapped, shared memories, passive element segments). An instance whose memory or table grew
//! cannot be restored; it is dropped, and the next task gets a fresh one.

use wasmtime::wasmparser::{Parser, Payload};

/// Whether instances of the component `wasm` may be recycled: none of its core modules, and
/// not the component itself, has a start function.
pub fn recyclable(wasm: &[u8]) -> bool {
    for payload in Parser::new(0).parse_all(wasm) {
        match payload {
            Ok(Payload::StartSection { .. } | Payload::ComponentStartSection { .. }) | Err(_) => {
                return false;
            }
            Ok(_) => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::recyclable;

    #[test]
    fn a_component_whose_core_module_has_a_start_function_is_not_recyclable() {
        assert!(!recyclable(&component(true)));
        assert!(recyclable(&component(false)));
    }

    /// A component holding one core module, with one function of type `[] -> []`, which is
    /// the module's start function if `start`.
    fn component(start: bool) -> Vec<u8> {
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend([1, 4, 1, 0x60, 0, 0]); // type section: () -> ()
        module.extend([3, 2, 1, 0]); // function section: one function of type 0
        if start {
            module.extend([8, 1, 0]); // start section: function 0
        }
        module.extend([10, 4, 1, 2, 0, 0x0b]); // code section: an empty body
        let mut component = b"\0asm\x0d\0\x01\0".to_vec();
        component.push(1); // core module section
        component.push(u8::try_from(module.len()).expect("a small module"));
        component.extend(module);
        component
    }
}
