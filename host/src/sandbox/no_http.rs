//! Linking a plugin that has no HTTP grant: every `wasi:http` function it imports is a trap.
//!
//! The component still links (its `wasi:http` resource types are types, no host code), but no
//! host code of `wasi:http` runs for it: it cannot build a request, hold header fields or send
//! anything, whatever the policy would say. The functions are taken from the component's own
//! imports and shadowed under the version the host links, which semver matching resolves them
//! to (wasmtime's `define_unknown_imports_as_traps` would define them under the plugin's own
//! version, beside the host's `wasi:io` resources, and the types would not match).

use super::TaskState;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker, types::ComponentItem};

/// The `wasi:http` package version the host links (wasmtime-wasi-http 48).
const WASI_HTTP_LINKED: &str = "0.2.12";

/// What a trapped call reports (the task fails as a `PluginTrap` with this message).
const DENIED: &str = "HTTP denied: this plugin has no HTTP grant (allow_http)";

/// A copy of `linker` in which each `wasi:http` function `component` imports traps.
pub(super) fn linker_for(
    engine: &Engine,
    linker: &Linker<TaskState>,
    component: &Component,
) -> wasmtime::Result<Linker<TaskState>> {
    let mut trapped = linker.clone();
    trapped.allow_shadowing(true);
    for (name, item) in component.component_type().imports(engine) {
        let Some(interface) = name.strip_prefix("wasi:http/") else {
            continue;
        };
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            continue;
        };
        let interface = interface.split('@').next().unwrap_or(interface);
        let mut linked = trapped.instance(&format!("wasi:http/{interface}@{WASI_HTTP_LINKED}"))?;
        for (func, export) in instance.exports(engine) {
            if matches!(export.ty, ComponentItem::ComponentFunc(_)) {
                linked.func_new(func, |_, _, _, _| Err(wasmtime::Error::msg(DENIED)))?;
            }
        }
    }
    Ok(trapped)
}
