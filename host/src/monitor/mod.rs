//! Watching and steering a worker from outside: Celery's remote control (`celery inspect`,
//! `celery control`, Flower), Celery's monitoring events, Prometheus metrics, and the HTTP
//! endpoint serving `/metrics`, `/healthz` and `/livez`.
//!
//! Knows the worker only through the [`control::Worker`] and [`endpoint::Status`] traits the
//! worker implements (`worker::remote`); reaches Redis only through `crate::redis`.
//!
//! - [`control`]: serving remote-control commands.
//! - [`revocations`]: revoked task ids, and stopping running ones.
//! - [`events`]: sending monitoring events, batched, never in a task's way.
//! - [`metrics`]: counters, histograms, and Prometheus' text format.
//! - [`endpoint`]: the small HTTP server for `/metrics`, `/healthz` and `/livez`.
//! - [`probe`]: asking that server from `taskhost health` (a container's health check).

pub mod control;
pub mod endpoint;
pub mod events;
pub mod metrics;
pub mod probe;
pub mod revocations;
