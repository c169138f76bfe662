//! taskhost: a worker host for Celery task queues on Redis that runs every task type as a
//! sandboxed, hot-loadable WebAssembly component.
//!
//! # Layout
//!
//! One folder per part, named for what it does; each says in its doc what it owns and what it
//! may not touch, and `host/tests/layout.rs` holds them to it. A task's path through them:
//! `redis` (fetched) → `worker` (decoded by `protocol`, passed through the gates, run in the
//! `sandbox` on a plugin from `plugins`, settled) → `redis` (result stored, message acked);
//! `monitor` watches. See `docs/architecture.md`.
//!
//! - [`protocol`]: Celery's formats: task messages, results and states, remote-control
//!   commands, events, Python's repr, time. Pure: no I/O.
//! - [`redis`]: everything that talks to Redis: queues and in-flight lists, the result
//!   backend, dead letters, recovery, the revoked set, remote-control and event channels,
//!   fleet deploys. Every key and Lua script is defined there. Knows no WebAssembly.
//! - [`config`]: `taskhost.toml`, flags and environment, resolved: a worker's settings and
//!   each plugin's grants.
//! - [`telemetry`]: distributed tracing: a span per task continuing the producer's trace,
//!   the context published messages carry, export over OTLP.
//! - [`sandbox`]: the wasmtime engine, per-task stores, the host side of the WIT imports, and
//!   the typed outcome of a run. Never sees Redis.
//! - [`plugins`]: loading `.wasm` files, the registry of task names, hot reload, the
//!   precompile cache, following fleet deploys.
//! - [`worker`]: the fetch → handle → settle loop, the gates, retries, and a clean stop.
//! - [`monitor`]: remote control, monitoring events, Prometheus metrics, `/healthz`.
//! - [`cli`]: the `taskhost` command line: parses and wires, nothing more.
//! - [`clock`]: the wall clock, read in one place.
//! - [`shutdown`]: the stop flag every loop watches. [`node`]: the machine's and the worker's
//!   names. [`signing`]: Ed25519 keys and signed deploy records.

pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod monitor;
pub mod node;
pub mod plugins;
pub mod protocol;
pub mod redis;
pub mod sandbox;
pub mod shutdown;
pub mod signing;
pub mod telemetry;
pub mod worker;

/// Locks `mutex`, through poisoning: every lock in the host guards plain map or counter updates
/// that a panic elsewhere cannot leave half-done, so the data stays usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
