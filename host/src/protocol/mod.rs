//! Celery's formats on Redis, and nothing else: the task message, the result document and its
//! states, remote-control commands and replies, monitoring events, Python's `repr`, and time as
//! Celery writes it.
//!
//! Pure: no I/O. Nothing here touches Redis, files, sockets or the environment, and nothing
//! here waits; what the moment supplies (the machine's hostname, a clock reading, the load
//! average) comes in as a value. `host/tests/layout.rs` keeps it so. Tested on messages
//! captured from real Celery 5.7 (`celery-protocol/SPEC.md`).
//!
//! - [`message`]: a task message, decoded (as a worker gets it) and encoded (as a producer
//!   sends it, and for a retry).
//! - [`canvas`]: what applying a signature (task, chain, group, chord) publishes, and what
//!   follows a task that succeeded or failed; [`signature`] reads signatures, [`embed`] the
//!   ones a message carries.
//! - [`result`]: task states (the one list of ready states), exceptions, the result document.
//! - [`pidbox`]: remote-control commands as typed requests, and the replies.
//! - [`event`]: monitoring events, task and worker.
//! - [`envelope`]: kombu's envelope of transient messages (events, replies).
//! - [`pyrepr`]: Python's `repr` of JSON values.
//! - [`time`]: Celery's ISO 8601 times and epoch readings.
//! - [`trace`]: W3C trace context (`traceparent`, `tracestate`) as producers send it.

pub mod canvas;
pub mod embed;
pub mod envelope;
pub mod event;
pub mod message;
pub mod pidbox;
pub mod pyrepr;
pub mod result;
pub mod signature;
pub mod time;
pub mod trace;

pub use message::{DecodeError, NewTask, TaskMessage, Undecodable, parse, truncate};
pub use result::{
    Exception, Meta, PartOutcome, RevokeReason, State, exception_document, is_hosts_state,
    is_ready, result_document,
};
