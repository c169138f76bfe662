//! The `taskhost` command line: flags in Celery's style, parsed here and handed to the room
//! that does the work. Parses and wires, nothing more: settings are resolved by `config`, the
//! worker runs in `worker`, the rest in the rooms each command names.
//!
//! - [`worker`]: `worker` and `dev`.
//! - [`task`]: `call` and `exec`.
//! - [`fleet`]: `plugins`, `deploy`, `rollback`, `deployments`.
//! - [`dead`]: `dead list|show|requeue|purge`.
//! - [`schedule`]: `beat` and `schedule list`.
//! - [`dev`]: the private redis-server of `taskhost dev`.
//!
//! `check` runs in the `check` room.

mod build;
mod dead;
mod dev;
mod fleet;
mod new;
mod schedule;
mod task;
mod watch;
mod worker;

use crate::config::WorkerFlags;
use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

/// This build's version and the commit it was built from (`host/build.rs`).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TASKHOST_COMMIT"),
    ")"
);

/// A Celery-compatible worker that runs each task type as a sandboxed WebAssembly component.
#[derive(Debug, Parser)]
#[command(name = "taskhost", version = VERSION, propagate_version = true)]
pub struct Cli {
    /// Log level, as Celery's: DEBUG, INFO, WARNING, ERROR, CRITICAL [default: INFO for worker
    /// and dev, WARNING otherwise]. RUST_LOG, if set, overrides it.
    #[arg(short = 'l', long, global = true, value_enum, ignore_case = true)]
    pub loglevel: Option<LogLevel>,
    /// Log lines as text, or as one JSON object per line (for log shippers).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// `taskhost check`: the worker's own flags, and how to print the report.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub flags: WorkerFlags,
    /// One JSON object (`{"passed": …, "checks": [{"name", "status", "detail"}]}`) instead of
    /// lines.
    #[arg(long)]
    pub json: bool,
}

/// `taskhost health`: where the worker listens, and which answer to ask for.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The worker's `--metrics-addr` (a wildcard address is asked on loopback).
    #[arg(long, env = "TASKHOST_METRICS_ADDR", default_value = "127.0.0.1:9808")]
    pub addr: String,
    /// Ask `/livez` (its loops run) instead of `/healthz` (it fetches, Redis answers).
    #[arg(long)]
    pub live: bool,
}

/// Celery's log levels.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
    Critical,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume Celery queues from Redis and run their tasks in the plugins of a directory.
    Worker(WorkerFlags),
    /// Check, before traffic arrives, that a worker started with these flags (and the
    /// environment and config file) would work here: config, Redis, ACL, eviction,
    /// persistence, clocks, plugins, grants, schedule, fleet trust. Exits 1 if it would not.
    Check(CheckArgs),
    /// Ask a running worker's `/healthz` (or `/livez`) on its `--metrics-addr`: exit 0 when it
    /// says healthy. A container's health check, where there is no curl.
    Health(HealthArgs),
    /// Try it out: a worker on a private redis-server (unless a broker is given) that stops
    /// with it, with the plugins of a directory.
    Dev(worker::DevArgs),
    /// Send a task, as Celery's `send_task` would; with --wait, print its result.
    Call(task::CallArgs),
    /// Run one task in a plugin file, locally, without Redis: the plugin author's loop.
    Exec(task::ExecArgs),
    /// Build the plugin in a directory into a component, whatever its language (Rust: a
    /// Cargo.toml; Python: an app.py; JavaScript: an app.js).
    Build(build::BuildArgs),
    /// Write a ready-to-build plugin project (Rust, Python or JavaScript) from a template.
    New(new::NewArgs),
    /// List the plugins of a directory: their tasks and WIT version, or why each was refused.
    Plugins(fleet::PluginsArgs),
    /// Publish a plugin to every worker following fleet deploys (`worker --fleet`).
    Deploy(fleet::DeployArgs),
    /// Return a deployed plugin to its previous version on every fleet worker.
    Rollback(fleet::RollbackArgs),
    /// Make a key pair for signing deploys (`deploy --sign-key`, `[fleet] trusted_keys`).
    Keygen(fleet::KeygenArgs),
    /// Show the deployed plugin versions, and what each running worker serves.
    Deployments(fleet::BrokerArgs),
    /// Inspect and replay the dead-letter list: messages that could not be run.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Run only the scheduler: send the `[schedule]` entries' ticks (workers run it too).
    Beat(schedule::BeatArgs),
    /// Show the `[schedule]` entries with their last and next runs.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
}

/// Parses the command line, sets up logging and runs the command; returns the exit code.
/// glibc raises its mmap threshold to the size of each large block freed, up to 32 MiB, so
/// after a plugin returns a 20 MiB error (lifted whole before the host cuts it) later blocks
/// that size come from the heap and stay in RSS. A fixed threshold keeps every block over
/// 1 MiB an mmap of its own, returned when freed: RSS stays near its baseline whatever
/// sizes plugins and producers send.
fn return_large_frees_to_the_system() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets allocator parameters; called once, before other threads.
        #[allow(unsafe_code)]
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        if set != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) was refused: large frees may stay in RSS");
        }
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Worker(_) | Command::Dev(_) | Command::Beat(_) => LogLevel::Info,
        _ => LogLevel::Warning,
    };
    init_logging(cli.loglevel.unwrap_or(default_level), cli.log_format);
    return_large_frees_to_the_system();
    if let Some(skew) = std::env::var("TASKHOST_TEST_CLOCK_SKEW_MS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        tracing::warn!(
            "TASKHOST_TEST_CLOCK_SKEW_MS: this process's clock reads {skew} ms off (a test hook)"
        );
        crate::clock::skew_clock(skew);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(io_threads())
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On a runtime thread, not the main thread block_on polls from: the worker's loop then
    // hands tasks to the runtime's threads without waking a thread of its own each time.
    let outcome = runtime.block_on(async {
        tokio::spawn(run(cli.command))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the command's task failed: {e}")))
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime's threads for the worker's own I/O, and for tasks until they have computed for
/// an epoch tick: `TASKHOST_IO_THREADS`, else one per core. Measured on two cores, one thread
/// took a tenth less CPU per task with half the thread wake-ups, but drained a fifth slower:
/// worth it where several workers share a machine.
fn io_threads() -> usize {
    crate::config::threads::from_env("TASKHOST_IO_THREADS", 1)
}

fn init_logging(level: LogLevel, format: LogFormat) {
    let level = match level {
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warning => "warn",
        LogLevel::Error | LogLevel::Critical => "error",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,taskhost={level}")));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One object per line: the message and every field at the top level, with the level
        // and target, as log shippers index them; a traced task's lines carry its trace's ids
        // under `span` (`span.trace_id`, `span.span_id`).
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Worker(flags) => worker::worker(&flags).await?,
        Command::Dev(args) => worker::dev(&args).await?,
        Command::Check(args) => return check(&args).await,
        Command::Health(args) => return health(&args).await,
        Command::Call(args) => return task::call(&args).await,
        Command::Exec(args) => return task::exec(&args).await,
        Command::New(args) => return new::new(&args),
        Command::Build(args) => {
            return tokio::task::spawn_blocking(move || build::build(&args)).await?;
        }
        Command::Plugins(args) => return fleet::list_plugins(&args).await,
        Command::Deploy(args) => fleet::deploy(&args).await?,
        Command::Rollback(args) => fleet::rollback(&args).await?,
        Command::Keygen(args) => fleet::keygen(&args)?,
        Command::Deployments(args) => fleet::deployments(&args).await?,
        Command::Dead(command) => dead::dead(command).await?,
        Command::Beat(args) => schedule::beat(&args).await?,
        Command::Schedule(command) => schedule::schedule(command).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let report = crate::check::run(&args.flags).await;
    if args.json {
        let json = serde_json::json!({ "passed": report.passed(), "checks": report.checks });
        println!("{json}");
    } else {
        print!("{}", report.lines());
    }
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn health(args: &HealthArgs) -> anyhow::Result<ExitCode> {
    use crate::monitor::probe;
    let path = if args.live { "/livez" } else { "/healthz" };
    let addr = probe::local_address(&args.addr);
    let (status, body) = probe::get(&addr, path, std::time::Duration::from_secs(3)).await?;
    print!("{body}");
    Ok(if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
