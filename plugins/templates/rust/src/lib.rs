//! {{name}}: a taskhost plugin in Rust.
//!
//! Build it with `taskhost build` (in this directory), try a task with
//! `taskhost exec {{name}}.wasm {{name}}.add --args '[2, 3]'`, and drop {{name}}.wasm into a
//! worker's plugin directory. Each function below is a Celery task: producers call it with
//! `app.send_task("{{name}}.add", (2, 3))`.

use serde_json::{Value, json};
use taskhost_sdk::{Failure, Kind, Result, tasks};

tasks! {
    /// x + y.
    #[task(name = "{{name}}.add")]
    fn add(x: i64, y: i64) -> Result<i64> {
        x.checked_add(y)
            .ok_or_else(|| Failure::error(Kind::OverflowError, format!("{x} + {y} overflows")))
    }

    /// Fails: `.get()` raises ValueError(message).
    #[task(name = "{{name}}.fail")]
    fn fail(message: String) -> Result<()> {
        Err(Failure::error(Kind::ValueError, message))
    }

    /// Reports its progress (state PROGRESS, as Celery's update_state), then returns `steps`.
    #[task(name = "{{name}}.progress")]
    fn progress(steps: u32) -> Result<u32> {
        for n in 1..=steps {
            taskhost_sdk::update_state("PROGRESS", &json!({"current": n, "total": steps}))?;
        }
        taskhost_sdk::log::info(&format!("counted to {steps}"));
        Ok(steps)
    }

    /// Asks to be retried until its `tries`-th try, then returns how many retries it took.
    #[task(name = "{{name}}.flaky", max_retries = 5)]
    fn flaky(tries: u32) -> Result<u32> {
        let retries = taskhost_sdk::task().retries;
        if retries + 1 < tries {
            return Err(Failure::retry_in(0.1, Kind::ConnectionError, "not yet"));
        }
        Ok(retries)
    }

    /// GETs `url` (an origin the operator granted with `allow_http`) and returns its JSON. `?`
    /// fails it with the kind Python would raise: `CapabilityDenied` for an origin not granted.
    #[task(name = "{{name}}.fetch")]
    fn fetch(url: String) -> Result<Value> {
        let answer = taskhost_sdk::http::get(&url)?;
        if !answer.ok() {
            return Err(Failure::error("HTTPError", format!("{url} answered {}", answer.status)));
        }
        Ok(answer.json()?)
    }
}
