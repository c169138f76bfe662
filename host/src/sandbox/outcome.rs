//! How a task run ended, as one typed [`Outcome`]: whatever the plugin returned or the host
//! stopped is sorted here, at the sandbox's edge, so the worker matches on types and never on
//! error strings.

use super::bindings::taskhost::plugin::types::{Failure as WitFailure, TaskError};
use super::limits::{ERROR_KIND_BYTES, ERROR_MESSAGE_BYTES, TRACEBACK_BYTES, cut};
use crate::protocol::Exception;
use serde_json::value::RawValue;

/// How a task run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The result: JSON text, checked to be valid and within the plugin's size limit.
    Success(Box<RawValue>),
    /// The plugin asked to run again.
    Retry {
        /// Seconds to wait, finite and not negative (a negative one is 0, a NaN or infinite one
        /// fails the task with ValueError); none for the task's backoff.
        countdown: Option<f64>,
        reason: Exception,
    },
    /// The task failed: the plugin said so, or the host stopped it.
    Failure(Failure),
    /// The plugin refused the message.
    Reject(String),
}

/// A failed run: what kind of failure, and the exception stored for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub kind: FailureKind,
    pub exception: Exception,
}

/// What made a run fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The hard time limit interrupted it.
    TimeLimit,
    /// It needed more memory than granted.
    Memory,
    /// It overflowed its WebAssembly stack.
    Stack,
    /// Its result was over the size limit.
    ResultSize,
    /// Its result was not JSON.
    InvalidResult,
    /// It trapped (a Rust plugin's panic, say), or its guest thread failed.
    Trap,
    /// It reported a denied capability (`CapabilityDenied`: a file, a socket, an origin not
    /// granted).
    Capability,
    /// It reported an error of its own.
    Plugin,
}

impl FailureKind {
    /// The sandbox limit this failure is, as the metrics name it; none for failures that are
    /// not a limit.
    pub fn limit(self) -> Option<&'static str> {
        match self {
            Self::TimeLimit => Some("time"),
            Self::Memory => Some("memory"),
            Self::Stack => Some("stack"),
            Self::ResultSize => Some("result_size"),
            Self::InvalidResult | Self::Trap | Self::Capability | Self::Plugin => None,
        }
    }
}

impl Outcome {
    /// A failure of `kind` with a new exception.
    pub fn failed(kind: FailureKind, exception_kind: &str, message: impl Into<String>) -> Self {
        Self::Failure(Failure {
            kind,
            exception: Exception::new(exception_kind, message),
        })
    }

    /// What a plugin returned from `run`: its result text (checked against `result_bytes`),
    /// or its failure.
    pub fn returned(returned: Result<String, WitFailure>, result_bytes: usize) -> Self {
        match returned {
            Ok(json) if json.len() > result_bytes => Self::failed(
                FailureKind::ResultSize,
                "ResultTooLarge",
                format!(
                    "the result is {} bytes, over this plugin's limit of {result_bytes} bytes (result_mb)",
                    json.len()
                ),
            ),
            Ok(json) => match RawValue::from_string(json) {
                Ok(raw) => Self::Success(raw),
                Err(e) => Self::failed(
                    FailureKind::InvalidResult,
                    "EncodeError",
                    format!("plugin returned invalid JSON: {e}"),
                ),
            },
            Err(failure) => from_wit(failure),
        }
    }
}

/// The plugin's own failure, as the WIT contract gives it, its texts cut to their bounds
/// before anything copies them into results, logs, events or dead letters.
fn from_wit(failure: WitFailure) -> Outcome {
    let exception = |e: TaskError| Exception {
        kind: if e.kind.is_empty() {
            "Exception".into()
        } else {
            cut(&e.kind, ERROR_KIND_BYTES).into_owned()
        },
        message: cut(&e.message, ERROR_MESSAGE_BYTES).into_owned(),
        traceback: e.traceback.map(|t| cut(&t, TRACEBACK_BYTES).into_owned()),
    };
    match failure {
        WitFailure::Error(e) => {
            let exception = exception(e);
            let kind = if exception.kind == "CapabilityDenied" {
                FailureKind::Capability
            } else {
                FailureKind::Plugin
            };
            Outcome::Failure(Failure { kind, exception })
        }
        WitFailure::Retry(r) => match r.countdown {
            // Celery's `retry(countdown=nan)` raises ValueError in the task; so does this.
            Some(c) if !c.is_finite() => Outcome::Failure(Failure {
                kind: FailureKind::Plugin,
                exception: Exception {
                    kind: "ValueError".into(),
                    message: format!(
                        "retry countdown must be a finite number of seconds, not {c} (retrying: {})",
                        cut(&r.reason.message, ERROR_MESSAGE_BYTES)
                    ),
                    traceback: r
                        .reason
                        .traceback
                        .map(|t| cut(&t, TRACEBACK_BYTES).into_owned()),
                },
            }),
            // An eta in the past, as in Celery: the retry is due at once.
            countdown => Outcome::Retry {
                countdown: countdown.map(|c| c.max(0.0)),
                reason: exception(r.reason),
            },
        },
        WitFailure::Reject(reason) => {
            Outcome::Reject(cut(&reason, ERROR_MESSAGE_BYTES).into_owned())
        }
    }
}

/// The guest's last words on stderr: a Rust panic prints `thread '…' panicked at FILE:LINE:COL:`
/// and the message on the lines after it, then `note: …`.
fn panic_message(stderr: &str) -> Option<String> {
    let lines: Vec<&str> = stderr.lines().collect();
    match lines.iter().rposition(|l| l.contains("panicked at")) {
        Some(at) => {
            let message: Vec<&str> = lines[at + 1..]
                .iter()
                .take_while(|l| !l.starts_with("note:"))
                .take(10)
                .copied()
                .collect();
            let place = lines[at].trim();
            Some(if message.is_empty() {
                place.to_owned()
            } else {
                format!("{} ({place})", message.join("\n").trim())
            })
        }
        None => lines
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned()),
    }
}

/// What stopped a guest that did not return: a stack overflow, or a trap (a Rust guest's panic
/// prints its message on stderr before it traps, so that message is the error's). The
/// guest's output goes in the traceback.
pub fn trapped(error: &wasmtime::Error, stderr: &str, stdout: &str) -> Outcome {
    let trap = error.downcast_ref::<wasmtime::Trap>().copied();
    let panic = panic_message(stderr);
    let (kind, mut exception) = match trap {
        Some(wasmtime::Trap::StackOverflow) => (
            FailureKind::Stack,
            Exception::new("StackOverflow", "the plugin overflowed its wasm stack"),
        ),
        Some(trap) => (
            FailureKind::Trap,
            Exception::new(
                "PluginTrap",
                match panic {
                    Some(msg) => format!("{trap}: {msg}"),
                    None => trap.to_string(),
                },
            ),
        ),
        None => (
            FailureKind::Trap,
            Exception::new("PluginTrap", format!("{error:#}")),
        ),
    };
    let output = [stdout, stderr]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join("\n");
    let traceback = if output.is_empty() {
        format!("{error:?}")
    } else {
        format!("{error:?}\n\nplugin output:\n{output}")
    };
    exception.traceback = Some(cut(&traceback, TRACEBACK_BYTES).into_owned());
    Outcome::Failure(Failure { kind, exception })
}

#[cfg(test)]
mod tests {
    use super::super::bindings::taskhost::plugin::types::RetryRequest;
    use super::*;

    #[test]
    fn finds_a_rust_panic_message_on_stderr() {
        let stderr = "starting\nthread '<unnamed>' (1) panicked at src/lib.rs:89:9:\noh no\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(
            panic_message(stderr).as_deref(),
            Some("oh no (thread '<unnamed>' (1) panicked at src/lib.rs:89:9:)")
        );
        assert_eq!(
            panic_message("just a line\n").as_deref(),
            Some("just a line")
        );
        assert_eq!(panic_message(""), None);
    }

    #[test]
    fn a_plugins_error_texts_are_cut_to_their_bounds() {
        let huge = WitFailure::Error(TaskError {
            kind: "K".repeat(1000),
            message: "m".repeat(10 << 20),
            traceback: Some("t".repeat(10 << 20)),
        });
        let Outcome::Failure(failure) = Outcome::returned(Err(huge), 16) else {
            panic!("a failure");
        };
        let e = failure.exception;
        assert!(e.kind.len() < ERROR_KIND_BYTES + 32, "{}", e.kind.len());
        assert!(e.message.len() < ERROR_MESSAGE_BYTES + 32);
        assert!(e.message.ends_with(&format!("({} bytes)", 10 << 20)));
        assert!(e.traceback.is_some_and(|t| t.len() < TRACEBACK_BYTES + 32));
        let Outcome::Reject(reason) =
            Outcome::returned(Err(WitFailure::Reject("r".repeat(1 << 20))), 16)
        else {
            panic!("a reject");
        };
        assert!(reason.len() < ERROR_MESSAGE_BYTES + 32);
    }

    #[test]
    fn a_result_is_checked_for_size_and_json() {
        assert!(matches!(
            Outcome::returned(Ok("[1, 2]".into()), 16),
            Outcome::Success(raw) if raw.get() == "[1, 2]"
        ));
        let kind = |outcome| match outcome {
            Outcome::Failure(f) => Some(f.kind),
            _ => None,
        };
        assert_eq!(
            kind(Outcome::returned(Ok("[1, 2, 3, 4, 5, 6, 7]".into()), 16)),
            Some(FailureKind::ResultSize)
        );
        assert_eq!(
            kind(Outcome::returned(Ok("{oops".into()), 16)),
            Some(FailureKind::InvalidResult)
        );
        let denied = WitFailure::Error(TaskError {
            kind: "CapabilityDenied".into(),
            message: "open /etc/passwd".into(),
            traceback: None,
        });
        assert_eq!(
            kind(Outcome::returned(Err(denied), 16)),
            Some(FailureKind::Capability)
        );
    }

    fn retry_in(countdown: f64) -> Outcome {
        let request = WitFailure::Retry(RetryRequest {
            countdown: Some(countdown),
            reason: TaskError {
                kind: "ConnectionError".into(),
                message: "not yet".into(),
                traceback: None,
            },
        });
        Outcome::returned(Err(request), 16)
    }

    #[test]
    fn a_retry_countdown_in_the_past_is_due_at_once() {
        assert!(matches!(retry_in(-5.0), Outcome::Retry { countdown: Some(c), .. } if c == 0.0));
        assert!(matches!(retry_in(2.5), Outcome::Retry { countdown: Some(c), .. } if c == 2.5));
    }

    #[test]
    fn a_retry_countdown_that_is_not_a_number_fails_the_task_with_value_error() {
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let Outcome::Failure(failure) = retry_in(bad) else {
                panic!("a failure for {bad}");
            };
            assert_eq!(failure.kind, FailureKind::Plugin);
            assert_eq!(failure.exception.kind, "ValueError");
            assert!(
                failure
                    .exception
                    .message
                    .contains("finite number of seconds")
                    && failure.exception.message.contains("not yet"),
                "{}",
                failure.exception.message
            );
        }
    }
}
