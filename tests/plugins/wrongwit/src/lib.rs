//! A plugin for a WIT version the host does not support (taskhost:plugin@0.2.0): otherwise
//! well-formed, serving demo.add, so only the version check can refuse it.

// The bindings wit-bindgen generates here (rather than in the SDK) use unsafe code.
#![allow(unsafe_code)]

#[allow(clippy::all)]
mod bindings {
    wit_bindgen::generate!({ world: "plugin", path: "wit" });
}

use bindings::exports::taskhost::plugin::handler::{Guest, Task, TaskInfo};
use bindings::taskhost::plugin::types::{Failure, TaskDefaults};

struct Plugin;

impl Guest for Plugin {
    fn version() -> String {
        "2.0.0".into()
    }

    fn tasks() -> Vec<TaskInfo> {
        vec![TaskInfo {
            name: "demo.add".into(),
            defaults: TaskDefaults {
                queue: None,
                max_retries: None,
                retry_backoff: None,
                retry_backoff_max: None,
                retry_jitter: None,
                soft_time_limit: None,
                time_limit: None,
                rate_limit: None,
            },
        }]
    }

    fn run(_task: Task) -> Result<String, Failure> {
        Ok("0".into())
    }
}

bindings::export!(Plugin with_types_in bindings);
