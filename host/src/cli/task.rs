//! `taskhost call` (send a task as Celery's `send_task` would, optionally waiting for its
//! result) and `taskhost exec` (run one task in a plugin file locally, without Redis).

use super::fleet::{load_one, local_sandbox};
use crate::config::FileConfig;
use crate::protocol::{NewTask, TaskMessage};
use crate::redis::{Backend, broker};
use crate::sandbox::{Outcome, Scope};
use crate::worker::{task_record, time_limits};
use anyhow::{Context as _, bail};
use clap::Args;
use serde_json::Value;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Positional and keyword arguments, as JSON text on the command line.
#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
}

impl TaskArgs {
    /// (args, kwargs), checked to be a JSON array and a JSON object.
    fn parse(&self) -> anyhow::Result<(Value, Value)> {
        let args: Value = serde_json::from_str(&self.args)
            .with_context(|| format!("--args is not JSON: {:?}", self.args))?;
        if !args.is_array() {
            bail!("--args must be a JSON array, e.g. '[2, 3]'");
        }
        let kwargs: Value = serde_json::from_str(&self.kwargs)
            .with_context(|| format!("--kwargs is not JSON: {:?}", self.kwargs))?;
        if !kwargs.is_object() {
            bail!("--kwargs must be a JSON object, e.g. '{{\"x\": 1}}'");
        }
        Ok((args, kwargs))
    }
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// Task name, e.g. demo.add.
    pub name: String,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Queue to send to.
    #[arg(short = 'Q', long, default_value = "celery")]
    pub queue: String,
    /// Priority 0-9 (on Redis, 0 is served first).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=9))]
    pub priority: u8,
    /// Run no sooner than this many seconds from now.
    #[arg(long)]
    pub countdown: Option<f64>,
    /// Revoke the task if it has not started within this many seconds.
    #[arg(long)]
    pub expires: Option<f64>,
    /// Wait for the result and print it (exit 1 if the task failed).
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Broker URL [default: CELERY_BROKER_URL, else a running `taskhost dev`].
    #[arg(short = 'b', long, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,
    /// Result backend URL [default: the broker].
    #[arg(long, env = "CELERY_RESULT_BACKEND")]
    pub result_backend: Option<String>,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The plugin file (.wasm).
    pub plugin: PathBuf,
    /// Task name, e.g. demo.add.
    pub name: String,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Run as this retry of the task.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Config file whose grants apply [default: ./taskhost.toml if present].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
}

/// A duration flag in seconds, checked.
fn seconds(flag: &str, value: Option<f64>) -> anyhow::Result<Option<Duration>> {
    match value {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Duration::try_from_secs_f64(s)
            .map(Some)
            .with_context(|| format!("{flag} is too large: {s}")),
        Some(s) => bail!("{flag} must be a non-negative number of seconds, got {s}"),
    }
}

pub async fn call(args: &CallArgs) -> anyhow::Result<ExitCode> {
    let (task_args, kwargs) = args.task.parse()?;
    let now = crate::clock::now();
    let at = |flag: &str, value: Option<f64>| -> anyhow::Result<Option<time::OffsetDateTime>> {
        seconds(flag, value)?
            .map(|d| {
                time::Duration::try_from(d)
                    .ok()
                    .and_then(|d| now.checked_add(d))
                    .with_context(|| format!("{flag} is too large"))
            })
            .transpose()
    };
    let task = NewTask {
        id: uuid::Uuid::new_v4().to_string(),
        task: args.name.clone(),
        args: task_args,
        kwargs,
        queue: args.queue.clone(),
        priority: args.priority,
        eta: at("--countdown", args.countdown)?,
        expires: at("--expires", args.expires)?,
        retries: 0,
        ..Default::default()
    };
    let timeout = seconds("--timeout", Some(args.timeout))?.unwrap_or(Duration::from_secs(60));
    let broker_url = args
        .broker
        .clone()
        .or_else(super::dev::running_broker)
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL (or start `taskhost dev`)")?;
    let backend_url = args
        .result_backend
        .clone()
        .unwrap_or_else(|| broker_url.clone());
    let client = crate::redis::client(&broker_url)?;
    let mut conn = crate::redis::manager(&client, &broker_url).await?;
    let waiter = if args.wait {
        let backend =
            Backend::connect(&backend_url, crate::config::resolve::DEFAULT_RESULT_EXPIRES).await?;
        Some(backend.subscribe(&task.id).await?)
    } else {
        None
    };
    let message = task.encode(&crate::node::origin());
    broker::publish(&mut conn, &task.queue, task.priority, &message).await?;
    let Some(waiter) = waiter else {
        println!("{}", task.id);
        return Ok(ExitCode::SUCCESS);
    };
    let doc = waiter.wait(timeout).await?;
    Ok(print_result(&task.id, &doc))
}

/// Prints a stored result: the value of a SUCCESS on stdout, anything else as one line on
/// stderr.
fn print_result(id: &str, doc: &Value) -> ExitCode {
    let status = doc.get("status").and_then(Value::as_str).unwrap_or("?");
    let result = doc.get("result").cloned().unwrap_or(Value::Null);
    if status == "SUCCESS" {
        println!("{result}");
        return ExitCode::SUCCESS;
    }
    let kind = result
        .get("exc_type")
        .and_then(Value::as_str)
        .unwrap_or("Error");
    let message = match result.get("exc_message") {
        Some(Value::Array(parts)) => parts
            .iter()
            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
        None => result.to_string(),
    };
    eprintln!("{status} {id}: {kind}: {message}");
    ExitCode::FAILURE
}

/// Runs the task exactly as a worker would run the message `call` would send for it.
pub async fn exec(args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let (task_args, kwargs) = args.task.parse()?;
    if !args.plugin.is_file() {
        bail!("plugin file {} does not exist", args.plugin.display());
    }
    let (file, _) = FileConfig::load(args.config.as_deref())?;
    let grants = file.grants(&|var| std::env::var(var).ok())?;
    let sandbox = local_sandbox(&file, &grants, crate::config::Compiler::Optimizing)?;
    let bytes = std::fs::read(&args.plugin)
        .with_context(|| format!("cannot read {}", args.plugin.display()))?;
    let plugin = load_one(&sandbox, &args.plugin, bytes, &grants).await?;
    let Some(spec) = plugin.tasks.iter().find(|t| t.name == args.name) else {
        let served: Vec<&str> = plugin.tasks.iter().map(|t| t.name.as_str()).collect();
        bail!(
            "{} does not serve task {:?} (it serves: {})",
            args.plugin.display(),
            args.name,
            served.join(", ")
        );
    };
    let sent = NewTask {
        id: uuid::Uuid::new_v4().to_string(),
        task: args.name.clone(),
        args: task_args,
        kwargs,
        queue: "celery".into(),
        priority: 0,
        eta: None,
        expires: None,
        retries: args.retries,
        ..Default::default()
    }
    .encode(&crate::node::origin());
    let message = TaskMessage::decode(&sent).map_err(|bad| anyhow::anyhow!("{}", bad.error))?;
    let plugin_grants = grants.for_plugin(&plugin.name);
    let (soft, hard) = time_limits((None, None), &plugin_grants.limits, &spec.defaults);
    let task = task_record(
        &message,
        soft.map(crate::clock::deadline_ms),
        &crate::node::node_name(None),
    );
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: args.name.clone(),
        task_id: message.id.as_str().into(),
        grants: plugin_grants,
        progress: None,
        outbox: None,
        trace: None,
    };
    let outcome = sandbox.run(&plugin.pre, scope, &task, hard).await?;
    Ok(print_outcome(outcome, args.retries))
}

/// Prints a local run's outcome: the result on stdout (exit 0), a failure or rejection on
/// stderr (exit 1), a retry request on stderr (exit 3).
fn print_outcome(outcome: Outcome, retries: u32) -> ExitCode {
    match outcome {
        Outcome::Success(json) => {
            println!("{}", json.get());
            ExitCode::SUCCESS
        }
        Outcome::Failure(failure) => {
            eprintln!(
                "FAILURE {}: {}",
                failure.exception.kind, failure.exception.message
            );
            ExitCode::FAILURE
        }
        Outcome::Retry { countdown, reason } => {
            let when =
                countdown.map_or_else(|| "after its backoff".to_owned(), |c| format!("in {c} s"));
            eprintln!(
                "RETRY requested ({when}; rerun with --retries {}): {}: {}",
                retries + 1,
                reason.kind,
                reason.message
            );
            ExitCode::from(3)
        }
        Outcome::Reject(reason) => {
            eprintln!("REJECTED: {reason}");
            ExitCode::FAILURE
        }
    }
}
