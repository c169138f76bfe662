//! The guest side of taskhost: write Celery tasks as plain Rust functions, build them with
//! `cargo build --target wasm32-wasip2 --release`, and drop the `.wasm` into a worker's plugin
//! directory.
//!
//! ```no_run
//! use taskhost_sdk::{tasks, Failure, Result};
//!
//! tasks! {
//!     /// Adds two integers.
//!     #[task(name = "demo.add")]
//!     fn add(x: i64, y: i64) -> Result<i64> {
//!         Ok(x + y)
//!     }
//!
//!     #[task(name = "demo.flaky", max_retries = 5, retry_backoff = 0.5)]
//!     fn flaky() -> Result<()> {
//!         Err(Failure::retry("Unavailable", "try again"))
//!     }
//! }
//! ```
//!
//! The [`tasks!`] macro keeps your functions as they are, and generates the component's exports:
//! the list of task names with their defaults, and a dispatcher that binds Celery's positional
//! `args` and keyword `kwargs` to the parameters by position and name (as Python would), and
//! serialises the result to JSON. A bad argument becomes a `TypeError` failure naming the
//! parameter, never a trap. [`task()`] tells the running task's id, retries and worker; [`log`],
//! [`update_state`] and [`config`] reach the host; [`canvas`] sends tasks, chains, groups and
//! chords from inside a task; [`trace`] adds spans of its own to the worker's trace.
//!
//! # Layout
//! - [`bindings`]: what `wit-bindgen` generates from `wit/plugin.wit`.
//! - this file: the author-facing API ([`Failure`], [`TaskDefaults`], [`task()`], [`config`],
//!   [`update_state`], [`log`]) and the [`tasks!`] macro.
//! - `args`: binding Celery arguments to parameters.
//! - [`canvas`]: signatures, and sending them.
//! - [`trace`]: spans of the plugin's own, in the worker's trace; [`otel`] their bindings.

mod args;
pub mod canvas;
mod error;
pub mod http;
mod macros;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod trace;

pub use error::Kind;

/// Generated from `wit/plugin.wit`. Plugin authors rarely need it directly.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "taskhost_sdk::bindings",
    });
}

/// Generated from `wit/otel/` (`wasi:otel/tracing` 0.2.0-rc.2): what [`trace`] calls. A plugin
/// that makes no span imports none of it.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod otel {
    wit_bindgen::generate!({
        world: "tracing",
        path: "../../wit/otel",
        generate_all,
    });
}

use bindings::exports::taskhost::plugin::handler;

/// The host's imports; outside WebAssembly (a plugin's `cargo test`), the test double's.
mod host {
    pub use crate::bindings::taskhost::plugin::host::Level;
    #[cfg(target_arch = "wasm32")]
    pub use crate::bindings::taskhost::plugin::host::{config, log, send, update_state};
    #[cfg(not(target_arch = "wasm32"))]
    pub use crate::testing::host::{config, log, send, update_state};
}
use bindings::taskhost::plugin::types;
use serde::Serialize;
use std::cell::RefCell;

#[doc(hidden)]
pub use args::Args;
#[doc(hidden)]
pub use serde_json;

/// What a task function returns: its value (serialised to JSON) or a [`Failure`].
pub type Result<T, E = Failure> = std::result::Result<T, E>;

/// Why a task did not succeed. Build one with [`Failure::error`], [`Failure::retry`],
/// [`Failure::retry_in`] or [`Failure::reject`]; `?` on any standard error makes an `Exception`
/// failure carrying the error's message.
#[derive(Debug, Clone)]
pub struct Failure(types::Failure);

impl Failure {
    /// Fail the task. `kind` is the exception type Python raises on `AsyncResult.get()`:
    /// Python's builtin names (`ValueError`, `KeyError`, `RuntimeError`, ...) re-raise as those
    /// builtins; any other name is raised as an exception class of that name.
    pub fn error(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self(types::Failure::Error(task_error(kind, message)))
    }

    /// Ask to be run again after the task's exponential backoff, until its `max_retries`.
    /// Once retries are exhausted the task fails with this kind and message.
    pub fn retry(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self(types::Failure::Retry(types::RetryRequest {
            countdown: None,
            reason: task_error(kind, message),
        }))
    }

    /// Ask to be run again in `seconds`, until the task's `max_retries`. A negative `seconds` is
    /// due at once (as Celery's eta in the past); NaN or infinity fails the task with ValueError.
    pub fn retry_in(seconds: f64, kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self(types::Failure::Retry(types::RetryRequest {
            countdown: Some(seconds),
            reason: task_error(kind, message),
        }))
    }

    /// Refuse the message: it is not retried and goes to the dead-letter list with `reason`.
    pub fn reject(reason: impl Into<String>) -> Self {
        Self(types::Failure::Reject(reason.into()))
    }

    /// Attach a traceback (free text) to an error or retry.
    pub fn with_traceback(mut self, traceback: impl Into<String>) -> Self {
        match &mut self.0 {
            types::Failure::Error(e)
            | types::Failure::Retry(types::RetryRequest { reason: e, .. }) => {
                e.traceback = Some(traceback.into());
            }
            types::Failure::Reject(_) => {}
        }
        self
    }
}

fn task_error(kind: impl Into<String>, message: impl Into<String>) -> types::TaskError {
    types::TaskError {
        kind: kind.into(),
        message: message.into(),
        traceback: None,
    }
}

/// Defaults a task declares for itself; set them in `#[task(...)]`, e.g.
/// `#[task(name = "x.y", max_retries = 3, retry_backoff = 2.0, time_limit = 60.0)]`.
/// The operator's configuration overrides them.
#[derive(Debug, Clone)]
pub struct TaskDefaults(types::TaskDefaults);

impl Default for TaskDefaults {
    fn default() -> Self {
        Self(types::TaskDefaults {
            queue: None,
            max_retries: None,
            retry_backoff: None,
            retry_backoff_max: None,
            retry_jitter: None,
            soft_time_limit: None,
            time_limit: None,
            rate_limit: None,
            autoretry_for: None,
        })
    }
}

impl TaskDefaults {
    /// No defaults: the host's apply.
    pub fn new() -> Self {
        Self::default()
    }
    /// The queue this host sends the task to when a plugin or a workflow step (a chain's next
    /// step, a callback, a chord body) sends it without naming one. Python producers route by
    /// their own `task_routes`.
    pub fn queue(mut self, queue: &str) -> Self {
        self.0.queue = Some(queue.to_owned());
        self
    }
    /// Retries allowed before the task fails.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.0.max_retries = Some(n);
        self
    }
    /// Base of the exponential retry backoff, in seconds.
    pub fn retry_backoff(mut self, seconds: f64) -> Self {
        self.0.retry_backoff = Some(seconds);
        self
    }
    /// Ceiling of the retry backoff, in seconds.
    pub fn retry_backoff_max(mut self, seconds: f64) -> Self {
        self.0.retry_backoff_max = Some(seconds);
        self
    }
    /// Whether to randomise the backoff (Celery's `retry_jitter`).
    pub fn retry_jitter(mut self, jitter: bool) -> Self {
        self.0.retry_jitter = Some(jitter);
        self
    }
    /// Soft time limit in seconds (see [`TaskContext::soft_deadline_ms`]).
    pub fn soft_time_limit(mut self, seconds: f64) -> Self {
        self.0.soft_time_limit = Some(seconds);
        self
    }
    /// Hard time limit in seconds: the run is interrupted.
    pub fn time_limit(mut self, seconds: f64) -> Self {
        self.0.time_limit = Some(seconds);
        self
    }
    /// Celery rate-limit notation, e.g. `"10/s"`.
    pub fn rate_limit(mut self, limit: &str) -> Self {
        self.0.rate_limit = Some(limit.to_owned());
        self
    }
    /// Error kinds that retry the task instead of failing it (Celery's `autoretry_for`), e.g.
    /// `autoretry_for = &["ConnectionError"]`.
    pub fn autoretry_for(mut self, kinds: &[&str]) -> Self {
        self.0.autoretry_for = Some(kinds.iter().map(|k| (*k).to_owned()).collect());
        self
    }
}

/// The running task, as the producer sent it and the worker runs it.
#[derive(Debug, Clone, Default)]
pub struct TaskContext {
    /// Celery task id.
    pub id: String,
    /// Task name.
    pub name: String,
    /// Retries so far (0 on the first run).
    pub retries: u32,
    /// Workflow root id.
    pub root_id: Option<String>,
    /// Id of the task that sent this one.
    pub parent_id: Option<String>,
    /// Soft deadline in milliseconds since the Unix epoch: past it, wrap up and return.
    pub soft_deadline_ms: Option<u64>,
    /// Name of the worker running the task.
    pub hostname: String,
}

thread_local! {
    static CURRENT: RefCell<TaskContext> = RefCell::new(TaskContext::default());
}

/// The task being run (an empty context outside a run).
pub fn task() -> TaskContext {
    CURRENT.with(|c| c.borrow().clone())
}

pub(crate) fn set_current(task: TaskContext) {
    CURRENT.with(|c| *c.borrow_mut() = task);
}

/// Time left before the task's soft time limit: none without one, zero once past it. A long
/// task checks it between steps and wraps up, as a Celery task catches
/// `SoftTimeLimitExceeded`.
pub fn soft_time_left() -> Option<std::time::Duration> {
    let deadline = task().soft_deadline_ms?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let left = u128::from(deadline).saturating_sub(now);
    Some(std::time::Duration::from_millis(
        u64::try_from(left).unwrap_or(u64::MAX),
    ))
}

/// One of this plugin's config values, as the operator set them in `taskhost.toml`.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// Publish progress (Celery's `update_state`): `state` such as `"PROGRESS"`, `meta` any
/// serialisable value. A waiting producer sees it as the task's state.
pub fn update_state(state: &str, meta: &impl Serialize) -> Result<(), String> {
    let meta = serde_json::to_string(meta).map_err(|e| e.to_string())?;
    host::update_state(state, &meta)
}

/// Structured logging into the worker's log, tagged with plugin, task name and id.
pub mod log {
    use super::host;

    /// Log `message` with extra `key=value` fields.
    pub fn event(level: host::Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<(String, String)> = fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        host::log(level, message, &fields);
    }
    /// Log at debug level.
    pub fn debug(message: &str) {
        event(host::Level::Debug, message, &[]);
    }
    /// Log at info level.
    pub fn info(message: &str) {
        event(host::Level::Info, message, &[]);
    }
    /// Log at warn level.
    pub fn warn(message: &str) {
        event(host::Level::Warn, message, &[]);
    }
    /// Log at error level.
    pub fn error(message: &str) {
        event(host::Level::Error, message, &[]);
    }
    pub use super::host::Level;
}

/// Machinery the [`tasks!`] macro expands to. Not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub use handler::{Guest, Task, TaskInfo};
    pub use types::Failure as WitFailure;

    pub fn task_info(name: &str, defaults: TaskDefaults) -> TaskInfo {
        TaskInfo {
            name: name.to_owned(),
            defaults: defaults.0,
        }
    }

    /// Runs one task: sets the context, binds arguments, serialises the outcome.
    pub fn run(
        task: Task,
        dispatch: impl FnOnce(&str, &mut Args) -> Result<String, Failure>,
    ) -> std::result::Result<String, WitFailure> {
        let mut args = match Args::parse(&task.name, &task.args, &task.kwargs) {
            Ok(args) => args,
            Err(failure) => return Err(failure.0),
        };
        let name = task.name.clone();
        set_current(TaskContext {
            id: task.id,
            name: task.name,
            retries: task.retries,
            root_id: task.root_id,
            parent_id: task.parent_id,
            soft_deadline_ms: task.soft_deadline_ms,
            hostname: task.hostname,
        });
        dispatch(&name, &mut args).map_err(|f| f.0)
    }

    /// What a task function may return: a result whose error `?` turns into a [`Failure`],
    /// or nothing (the result is `null`).
    pub trait IntoOutcome {
        fn into_outcome(self) -> Result<String, Failure>;
    }

    impl IntoOutcome for () {
        fn into_outcome(self) -> Result<String, Failure> {
            Ok("null".to_owned())
        }
    }

    impl<T: Serialize, E: Into<Failure>> IntoOutcome for std::result::Result<T, E> {
        fn into_outcome(self) -> Result<String, Failure> {
            let value = self.map_err(Into::into)?;
            serde_json::to_string(&value)
                .map_err(|e| Failure::error("EncodeError", format!("result is not JSON: {e}")))
        }
    }

    /// Serialises a task function's outcome.
    pub fn output(outcome: impl IntoOutcome) -> Result<String, Failure> {
        outcome.into_outcome()
    }

    /// Calls a function with its arguments as a tuple (what the macro binds).
    pub trait Apply<Args> {
        type Output;
        fn apply(self, args: Args) -> Self::Output;
    }

    macro_rules! apply {
        ($($t:ident),*) => {
            impl<F, R, $($t),*> Apply<($($t,)*)> for F
            where
                F: FnOnce($($t),*) -> R,
            {
                type Output = R;
                #[allow(non_snake_case)]
                fn apply(self, ($($t,)*): ($($t,)*)) -> R {
                    self($($t),*)
                }
            }
        };
    }
    apply!();
    apply!(A);
    apply!(A, B);
    apply!(A, B, C);
    apply!(A, B, C, D);
    apply!(A, B, C, D, E);
    apply!(A, B, C, D, E, G);
    apply!(A, B, C, D, E, G, H);
    apply!(A, B, C, D, E, G, H, I);
    apply!(A, B, C, D, E, G, H, I, J);
    apply!(A, B, C, D, E, G, H, I, J, K);
    apply!(A, B, C, D, E, G, H, I, J, K, L);
    apply!(A, B, C, D, E, G, H, I, J, K, L, M);

    /// A parameter's name from its stringified binding, `x` or `mut x`.
    pub fn parameter(binding: &'static str) -> &'static str {
        binding.strip_prefix("mut ").unwrap_or(binding).trim()
    }

    pub fn not_served(name: &str) -> Failure {
        Failure::error(
            "NotRegistered",
            format!("this plugin does not serve task {name:?}"),
        )
    }
}
