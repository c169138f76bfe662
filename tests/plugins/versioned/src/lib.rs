//! A stand-in for the demo plugin that says which build ran each task: built plain it reports
//! "v1", built with `--features v2` it reports "v2". The hot-reload tests swap the two. Built
//! with `--features nested` its tasks are `demo.sub.add` and `demo.sub.echo`, which a plugin
//! named `demo` and one named `demo.sub` both serve by default.

use serde_json::{Value, json};
use taskhost_sdk::{Result, tasks};

const VERSION: &str = if cfg!(feature = "v2") { "v2" } else { "v1" };

#[cfg(not(feature = "nested"))]
tasks! {
    /// x + y, and which build computed it.
    #[task(name = "demo.add")]
    fn add(x: i64, y: i64) -> Result<Value> {
        Ok(json!({"sum": x + y, "version": VERSION}))
    }

    /// The value back, and which build returned it.
    #[task(name = "demo.echo")]
    fn echo(value: Value) -> Result<Value> {
        Ok(json!({"value": value, "version": VERSION}))
    }
}

#[cfg(feature = "nested")]
tasks! {
    /// x + y, and which build computed it.
    #[task(name = "demo.sub.add")]
    fn add(x: i64, y: i64) -> Result<Value> {
        Ok(json!({"sum": x + y, "version": VERSION}))
    }

    /// The value back, and which build returned it.
    #[task(name = "demo.sub.echo")]
    fn echo(value: Value) -> Result<Value> {
        Ok(json!({"value": value, "version": VERSION}))
    }
}
