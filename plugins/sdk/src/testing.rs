//! A test double for the host, so a plugin's `cargo test` runs its task functions on the
//! author's machine (outside WebAssembly): config values you set, and the progress, log lines
//! and sent tasks recorded for your asserts.
//!
//! ```
//! use taskhost_sdk::testing::FakeHost;
//!
//! let host = FakeHost::new().config("greeting", "Hi").retries(2);
//! assert_eq!(taskhost_sdk::config("greeting").as_deref(), Some("Hi"));
//! assert_eq!(taskhost_sdk::task().retries, 2);
//! taskhost_sdk::update_state("PROGRESS", &serde_json::json!({"n": 1})).unwrap();
//! assert_eq!(host.progress().len(), 1);
//! ```
//!
//! Each test thread has a double of its own; [`FakeHost::new`] starts it afresh.

use crate::TaskContext;
use crate::bindings::taskhost::plugin::host::Level;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;

#[derive(Default)]
struct Recorded {
    config: HashMap<String, String>,
    progress: Vec<(String, Value)>,
    logs: Vec<(Level, String)>,
    sent: Vec<Value>,
}

thread_local! {
    static RECORDED: RefCell<Recorded> = RefCell::new(Recorded::default());
}

/// This thread's host double: set it up, run a task function, read what it did.
#[derive(Debug)]
pub struct FakeHost(());

impl FakeHost {
    /// A fresh double for this thread: no config, nothing recorded, a task context with id
    /// `test-task` on worker `test@localhost`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        RECORDED.with(|r| *r.borrow_mut() = Recorded::default());
        crate::set_current(TaskContext {
            id: "test-task".into(),
            hostname: "test@localhost".into(),
            ..TaskContext::default()
        });
        Self(())
    }

    /// A config value the plugin reads with [`crate::config`].
    pub fn config(self, key: &str, value: &str) -> Self {
        RECORDED.with(|r| {
            r.borrow_mut()
                .config
                .insert(key.to_owned(), value.to_owned())
        });
        self
    }

    /// The running task as [`crate::task`] tells it.
    pub fn task(self, task: TaskContext) -> Self {
        crate::set_current(task);
        self
    }

    /// Runs the task as retry `n`.
    pub fn retries(self, n: u32) -> Self {
        let mut task = crate::task();
        task.retries = n;
        crate::set_current(task);
        self
    }

    /// Each `update_state` so far: (state, meta).
    pub fn progress(&self) -> Vec<(String, Value)> {
        RECORDED.with(|r| r.borrow().progress.clone())
    }

    /// Each log line so far (also what the plugin printed through the SDK's `log`).
    pub fn logs(&self) -> Vec<(Level, String)> {
        RECORDED.with(|r| r.borrow().logs.clone())
    }

    /// Each signature sent so far, as JSON.
    pub fn sent(&self) -> Vec<Value> {
        RECORDED.with(|r| r.borrow().sent.clone())
    }
}

/// The host's imports, answered by the double (the SDK calls these outside WebAssembly).
pub(crate) mod host {
    use super::{Level, RECORDED};

    pub fn config(key: &str) -> Option<String> {
        RECORDED.with(|r| r.borrow().config.get(key).cloned())
    }

    /// As the worker does: the worker's own states are refused.
    pub fn update_state(state: &str, meta: &str) -> Result<(), String> {
        const READY: [&str; 6] = [
            "SUCCESS", "FAILURE", "REVOKED", "RETRY", "REJECTED", "IGNORED",
        ];
        if READY.contains(&state) {
            return Err(format!("state {state} is the worker's to store"));
        }
        let meta = serde_json::from_str(meta).map_err(|e| e.to_string())?;
        RECORDED.with(|r| r.borrow_mut().progress.push((state.to_owned(), meta)));
        Ok(())
    }

    pub fn log(level: Level, message: &str, _fields: &[(String, String)]) {
        RECORDED.with(|r| r.borrow_mut().logs.push((level, message.to_owned())));
    }

    pub fn send(signature: &str) -> Result<String, String> {
        let signature: serde_json::Value =
            serde_json::from_str(signature).map_err(|e| e.to_string())?;
        RECORDED.with(|r| {
            let mut recorded = r.borrow_mut();
            recorded.sent.push(signature);
            Ok(format!("sent-{}", recorded.sent.len()))
        })
    }
}
