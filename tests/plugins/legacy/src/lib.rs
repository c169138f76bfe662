//! A plugin built against taskhost:plugin@0.1.0, the contract before `host.send` was added
//! (its `wit/` is that version, frozen): a host of a later minor version must load and run it.

// The bindings wit-bindgen generates here (rather than in the SDK) use unsafe code.
#![allow(unsafe_code)]

#[allow(clippy::all)]
mod bindings {
    wit_bindgen::generate!({ world: "plugin", path: "wit" });
}

use bindings::exports::taskhost::plugin::handler::{Guest, Task, TaskInfo};
use bindings::taskhost::plugin::types::{Failure, TaskDefaults, TaskError};

struct Plugin;

impl Guest for Plugin {
    fn version() -> String {
        "0.1.0".into()
    }

    fn tasks() -> Vec<TaskInfo> {
        vec![TaskInfo {
            name: "legacy.add".into(),
            defaults: TaskDefaults {
                queue: None,
                max_retries: None,
                retry_backoff: None,
                retry_backoff_max: None,
                retry_jitter: None,
                soft_time_limit: None,
                time_limit: None,
                rate_limit: None,
                autoretry_for: None,
            },
        }]
    }

    /// legacy.add(x, y) -> x + y, parsed by hand (no SDK).
    fn run(task: Task) -> Result<String, Failure> {
        let numbers: Vec<i64> = task
            .args
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|n| n.trim().parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|e| {
                Failure::Error(TaskError {
                    kind: "TypeError".into(),
                    message: e.to_string(),
                    traceback: None,
                })
            })?;
        Ok(numbers.iter().sum::<i64>().to_string())
    }
}

bindings::export!(Plugin with_types_in bindings);
