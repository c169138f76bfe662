//! taskhost: a worker host for Celery task queues on Redis that runs every task type as a
//! sandboxed, hot-loadable WebAssembly component.
//!
//! # Layout
//! - [`cli`]: the `taskhost` command line and how settings are resolved.
//! - [`config`]: `taskhost.toml`, the operator's grants and limits per plugin.
//! - [`protocol`]: Celery's message and result formats (pure, no I/O).
//! - [`broker`]: Redis queues: atomic fetch into the in-flight list, ack, delay, dead letters.
//! - [`results`]: the result backend: storing states, waiting for results.
//! - [`plugins`]: loading `.wasm` files, the registry of task names, hot reload, the
//!   precompile cache.
//! - [`deploy`]: fleet-wide deploys and rollbacks through Redis.
//! - [`deadletter`]: the dead-letter list, for operators.
//! - [`sandbox`]: the wasmtime engine, per-task stores, the host side of the WIT imports.
//! - [`worker`]: the fetch → run → settle loop.
//! - [`settler`]: task outcomes written in batches (group commit).
//! - [`recovery`]: heartbeats, and returning a dead worker's tasks.
//! - [`control`]: Celery's remote control (`celery inspect`/`control`, Flower).
//! - [`events`]: Celery's monitoring events (`-E`).
//! - [`metrics`]: Prometheus counters and the text format; [`endpoint`] serves them with
//!   `/healthz`.
//! - [`ratelimit`]: per-task rate limits.
//! - [`pyrepr`]: Python's `repr` of JSON values, as Celery's monitors show them.
//! - [`shutdown`]: the stop flag every loop watches.
//! - [`dev`]: the private redis-server of `taskhost dev`.
//! - [`node`]: the worker's name.

pub mod broker;
pub mod cli;
pub mod config;
pub mod control;
pub mod deadletter;
pub mod deploy;
pub mod dev;
pub mod endpoint;
pub mod events;
pub mod metrics;
pub mod node;
pub mod plugins;
pub mod protocol;
pub mod pyrepr;
pub mod ratelimit;
pub mod recovery;
pub mod results;
pub mod sandbox;
pub mod settler;
pub mod shutdown;
pub mod worker;

/// Locks `mutex`, through poisoning: every lock in the host guards plain map or counter updates
/// that a panic elsewhere cannot leave half-done, so the data stays usable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
