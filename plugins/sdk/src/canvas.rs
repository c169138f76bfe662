//! Sending tasks from inside a task, as Celery's `signature(...).apply_async()`: a task, or a
//! chain, group or chord of them, built here and handed to the host (`send`), which publishes
//! it when the running task settles. What is sent has the running task as its parent.
//!
//! ```no_run
//! use taskhost_sdk::canvas::{Signature, chord};
//!
//! # fn example() -> Result<(), String> {
//! let id = Signature::new("demo.add", (2, 3)).countdown(10.0).send()?;
//! let parts = (0..10).map(|i| Signature::new("demo.add", (i, i)));
//! let body_id = chord(parts, Signature::new("demo.tsum", ())).send()?;
//! # Ok(()) }
//! ```

use serde::Serialize;
use serde_json::{Map, Value, json};

/// A task with its arguments and options, or a chain, group or chord of them (Celery's
/// signature, as JSON).
#[derive(Debug, Clone, PartialEq)]
pub struct Signature(Value);

impl Signature {
    /// The task `name` with positional `args`: a tuple, a `Vec`, or `()` for none.
    pub fn new(name: &str, args: impl Serialize) -> Self {
        let args = match serde_json::to_value(args) {
            Ok(Value::Array(items)) => Value::Array(items),
            Ok(Value::Null) | Err(_) => json!([]),
            Ok(one) => json!([one]),
        };
        Self(json!({
            "task": name, "args": args, "kwargs": {}, "options": {},
            "subtask_type": null, "immutable": false,
        }))
    }

    /// A signature given as Celery's JSON, as a task receives one in its arguments (Celery's
    /// `signature(dict)`). The host checks it when it is sent.
    pub fn from_json(signature: Value) -> Self {
        Self(signature)
    }

    /// Keyword arguments: a map or a struct.
    pub fn kwargs(mut self, kwargs: impl Serialize) -> Self {
        if let Ok(value @ Value::Object(_)) = serde_json::to_value(kwargs) {
            self.0["kwargs"] = value;
        }
        self
    }

    /// The queue it goes to [default: celery].
    pub fn queue(self, queue: &str) -> Self {
        self.option("queue", json!(queue))
    }

    /// Seconds to wait before it runs.
    pub fn countdown(self, seconds: f64) -> Self {
        self.option("countdown", json!(seconds))
    }

    /// Its priority, 0 (first) to 9, as kombu orders them on Redis.
    pub fn priority(self, priority: u8) -> Self {
        self.option("priority", json!(priority))
    }

    /// A task called with this one's result when it succeeds.
    pub fn link(self, callback: Signature) -> Self {
        self.append("link", callback)
    }

    /// A task called with this one's id when it fails.
    pub fn link_error(self, errback: Signature) -> Self {
        self.append("link_error", errback)
    }

    /// Keeps its own arguments when used as a callback or chain step (Celery's `si`).
    pub fn immutable(mut self) -> Self {
        self.0["immutable"] = json!(true);
        self
    }

    /// Sends it; returns the id of its result (a group's id for a group, the body's for a
    /// chord).
    pub fn send(&self) -> Result<String, String> {
        crate::host::send(&self.0.to_string())
    }

    /// The signature as Celery's JSON.
    pub fn to_json(&self) -> &Value {
        &self.0
    }

    fn option(mut self, key: &str, value: Value) -> Self {
        if let Some(options) = self.0["options"].as_object_mut() {
            options.insert(key.into(), value);
        }
        self
    }

    fn append(mut self, key: &str, sig: Signature) -> Self {
        if let Some(options) = self.0["options"].as_object_mut() {
            match options.get_mut(key) {
                Some(Value::Array(list)) => list.push(sig.0),
                _ => {
                    options.insert(key.into(), json!([sig.0]));
                }
            }
        }
        self
    }
}

fn canvas(task: &str, kind: &str, kwargs: Map<String, Value>) -> Signature {
    Signature(json!({
        "task": task, "args": [], "kwargs": kwargs, "options": {},
        "subtask_type": kind, "immutable": false,
    }))
}

fn list(tasks: impl IntoIterator<Item = Signature>) -> Value {
    Value::Array(tasks.into_iter().map(|s| s.0).collect())
}

/// Runs each task after the one before, passing its result on.
pub fn chain(tasks: impl IntoIterator<Item = Signature>) -> Signature {
    canvas(
        "celery.chain",
        "chain",
        Map::from_iter([("tasks".to_owned(), list(tasks))]),
    )
}

/// Runs the tasks in parallel; their results are read together in order (`GroupResult`).
pub fn group(tasks: impl IntoIterator<Item = Signature>) -> Signature {
    canvas(
        "celery.group",
        "group",
        Map::from_iter([("tasks".to_owned(), list(tasks))]),
    )
}

/// Runs `header` in parallel, then `body` once with the list of their results.
pub fn chord(header: impl IntoIterator<Item = Signature>, body: Signature) -> Signature {
    canvas(
        "celery.chord",
        "chord",
        Map::from_iter([
            ("header".to_owned(), list(header)),
            ("body".to_owned(), body.0),
            ("kwargs".to_owned(), json!({})),
        ]),
    )
}
