//! What the result backend holds for a task, as Celery's Redis backend stores it: the states,
//! the one list of ready states, the document at `celery-task-meta-<id>`, and exceptions in
//! the shape Python re-raises on `AsyncResult.get()`. See `celery-protocol/SPEC.md` section 7.

use super::time::format_time;
use serde::Serialize;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// A task state this host writes. (Plugins' progress states, such as `PROGRESS`, are free text
/// and never ready.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Success,
    Failure,
    Retry,
    Revoked,
}

impl State {
    /// The states after which a result no longer changes (Celery's `READY_STATES`): a waiter
    /// returns on them, and only they carry a `date_done`.
    pub const READY: [State; 3] = [State::Success, State::Failure, State::Revoked];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Success => "SUCCESS",
            State::Failure => "FAILURE",
            State::Retry => "RETRY",
            State::Revoked => "REVOKED",
        }
    }
}

/// Whether a stored status is ready (see [`State::READY`]).
pub fn is_ready(status: &str) -> bool {
    State::READY.iter().any(|s| s.as_str() == status)
}

/// Whether only the worker may store `status`: the ready states, and those Celery's clients
/// read an exception or a worker's verdict from (`RETRY`, `REJECTED`, `IGNORED`). A plugin's
/// progress may use any other name (`PROGRESS`, `STARTED`, its own).
pub fn is_hosts_state(status: &str) -> bool {
    is_ready(status) || matches!(status, "RETRY" | "REJECTED" | "IGNORED")
}

/// Why a task was revoked: the message of its `TaskRevokedError`, and what the `task-revoked`
/// event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeReason {
    /// By id, before it ran (`celery control revoke`).
    Revoked,
    /// Its `expires` passed before it could run.
    Expired,
    /// Stopped while running (`revoke(terminate=True)`).
    Terminated,
}

impl RevokeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::Terminated => "terminated",
        }
    }

    /// The exception stored as the REVOKED result.
    pub fn exception(self) -> Exception {
        Exception::new("TaskRevokedError", self.as_str())
    }
}

/// An exception as Celery stores it, so Python re-raises it on `AsyncResult.get()`.
#[derive(Debug, Clone, PartialEq)]
pub struct Exception {
    pub kind: String,
    pub message: String,
    pub traceback: Option<String>,
}

impl Exception {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            message: message.into(),
            traceback: None,
        }
    }

    /// `{"exc_type", "exc_message": [message], "exc_module"}`: Python's builtin exception names
    /// map to `builtins`, Celery's to `celery.exceptions`; any other name is a module Python
    /// does not have, so Celery synthesises an exception class of that name.
    pub fn to_json(&self) -> Value {
        json!({
            "exc_type": self.kind,
            "exc_message": [self.message],
            "exc_module": exception_module(&self.kind),
        })
    }
}

const PYTHON_BUILTIN_EXCEPTIONS: &[&str] = &[
    "ArithmeticError",
    "AssertionError",
    "AttributeError",
    "ConnectionError",
    "Exception",
    "FileNotFoundError",
    "IndexError",
    "KeyError",
    "LookupError",
    "MemoryError",
    "NotImplementedError",
    "OSError",
    "OverflowError",
    "PermissionError",
    "RecursionError",
    "RuntimeError",
    "TimeoutError",
    "TypeError",
    "ValueError",
    "ZeroDivisionError",
];

const CELERY_EXCEPTIONS: &[&str] = &[
    "NotRegistered",
    "MaxRetriesExceededError",
    "TaskRevokedError",
    "TimeLimitExceeded",
    "SoftTimeLimitExceeded",
    "Reject",
    "WorkerLostError",
    "ChordError",
];

fn exception_module(kind: &str) -> &'static str {
    if PYTHON_BUILTIN_EXCEPTIONS.contains(&kind) {
        "builtins"
    } else if CELERY_EXCEPTIONS.contains(&kind) {
        "celery.exceptions"
    } else {
        "taskhost.exceptions"
    }
}

/// What identifies a task in its result document.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    pub task_id: &'a str,
    pub parent_id: Option<&'a str>,
    pub group: Option<&'a str>,
    /// The result tuples of the tasks this one sent (a chain's next step, its callbacks).
    pub children: &'a [Value],
}

impl<'a> Meta<'a> {
    /// A task known by its id alone (no parent, no group).
    pub fn of(task_id: &'a str) -> Self {
        Self {
            task_id,
            parent_id: None,
            group: None,
            children: &[],
        }
    }
}

/// The result document, field by field, so a result given as raw JSON text is written as it is.
#[derive(Serialize)]
struct ResultDocument<'a, R: Serialize + ?Sized> {
    status: &'a str,
    result: &'a R,
    traceback: Option<&'a str>,
    children: &'a [Value],
    date_done: Option<String>,
    task_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_id: Option<&'a str>,
}

/// The document stored at `celery-task-meta-<id>` and published on that channel. `status` is
/// a [`State`] or a custom progress state such as `PROGRESS`; only ready states get a
/// `date_done`, as Celery stores them. `result` is anything that serialises to JSON: a value,
/// or a plugin's result as the raw text it returned.
pub fn result_document<R: Serialize + ?Sized>(
    meta: &Meta<'_>,
    status: &str,
    result: &R,
    traceback: Option<&str>,
    now: OffsetDateTime,
) -> String {
    let doc = ResultDocument {
        status,
        result,
        traceback,
        children: meta.children,
        date_done: is_ready(status).then(|| format_time(now)),
        task_id: meta.task_id,
        parent_id: meta.parent_id,
        group_id: meta.group,
    };
    // Cannot fail: strings, options, and a value or valid raw JSON.
    serde_json::to_string(&doc).unwrap_or_default()
}

/// One chord part's outcome as Celery's Redis backend keeps it in the chord's join list:
/// `[1, task_id, state, result]`, the result being a value or an exception document.
#[derive(Debug, Clone, PartialEq)]
pub struct PartOutcome {
    pub task_id: String,
    pub state: String,
    pub result: Value,
}

impl PartOutcome {
    /// The entry of task `task_id` that ended in `state` with `result` (JSON text).
    pub fn encode(task_id: &str, state: &str, result: &str) -> String {
        format!(
            "[1, {}, {}, {result}]",
            Value::from(task_id),
            Value::from(state)
        )
    }

    /// Reads an entry; why it cannot, for one that is not `[_, id, state, result]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (_, task_id, state, result): (Value, Value, String, Value) =
            serde_json::from_str(text).map_err(|e| e.to_string())?;
        let task_id = match task_id {
            Value::String(id) => id,
            other => other.to_string(),
        };
        Ok(Self {
            task_id,
            state,
            result,
        })
    }

    /// Whether the part failed (FAILURE or REVOKED), failing its chord.
    pub fn failed(&self) -> bool {
        self.state == State::Failure.as_str() || self.state == State::Revoked.as_str()
    }

    /// The failed part's exception type and first message argument.
    pub fn exception(&self) -> (&str, &str) {
        let kind = self.result["exc_type"].as_str().unwrap_or("Exception");
        let message = self.result["exc_message"]
            .get(0)
            .and_then(Value::as_str)
            .unwrap_or("");
        (kind, message)
    }
}

/// The document of a task that ended in `state` with `exception` (FAILURE, REVOKED, RETRY).
pub fn exception_document(
    meta: &Meta<'_>,
    state: State,
    exception: &Exception,
    now: OffsetDateTime,
) -> String {
    result_document(
        meta,
        state.as_str(),
        &exception.to_json(),
        exception.traceback.as_deref(),
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_map_to_python_modules() {
        assert_eq!(
            Exception::new("ValueError", "x").to_json()["exc_module"],
            "builtins"
        );
        assert_eq!(
            Exception::new("NotRegistered", "x").to_json()["exc_module"],
            "celery.exceptions"
        );
        assert_eq!(
            Exception::new("HTTPError", "x").to_json()["exc_message"],
            json!(["x"])
        );
    }

    #[test]
    fn a_chord_part_reads_back_as_it_was_written() {
        let text = PartOutcome::encode(
            "t-1",
            "FAILURE",
            r#"{"exc_type": "KeyError", "exc_message": ["k"]}"#,
        );
        let part = PartOutcome::parse(&text).expect("parses");
        assert_eq!(part.task_id, "t-1");
        assert!(part.failed());
        assert_eq!(part.exception(), ("KeyError", "k"));
        assert!(PartOutcome::parse("[1, \"t\"]").is_err(), "too short");
        assert!(
            !PartOutcome::parse(&PartOutcome::encode("t", "SUCCESS", "3"))
                .expect("parses")
                .failed()
        );
    }

    #[test]
    fn only_ready_states_are_dated() {
        let meta = Meta::of("id");
        let now = OffsetDateTime::UNIX_EPOCH;
        for state in State::READY {
            let doc: Value =
                serde_json::from_str(&result_document(&meta, state.as_str(), &1, None, now))
                    .expect("JSON");
            assert!(doc["date_done"].is_string(), "{state:?}");
        }
        for status in ["RETRY", "PROGRESS", "STARTED"] {
            let doc: Value =
                serde_json::from_str(&result_document(&meta, status, &1, None, now)).expect("JSON");
            assert!(doc["date_done"].is_null(), "{status}");
        }
    }
}
