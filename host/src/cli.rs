//! The `taskhost` command line: flags in Celery's style, resolution of settings (flags, then
//! Celery's environment variables, then `taskhost.toml`), and the five commands.

use crate::config::{FileConfig, GrantTable};
use crate::plugins::cache::Cache;
use crate::plugins::live::Live;
use crate::protocol::NewTask;
use crate::results::Backend;
use crate::sandbox::{Outcome, Sandbox, SandboxOptions, Scope, Task};
use crate::worker::WorkerConfig;
use crate::{broker, deadletter, deploy, dev, node, plugins, results, worker};
use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A Celery-compatible worker that runs each task type as a sandboxed WebAssembly component.
#[derive(Debug, Parser)]
#[command(name = "taskhost", version, propagate_version = true)]
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
    Worker(WorkerArgs),
    /// Try it out: a worker on a private redis-server (unless a broker is given) that stops
    /// with it, with the plugins of a directory.
    Dev(WorkerArgs),
    /// Send a task, as Celery's `send_task` would; with --wait, print its result.
    Call(CallArgs),
    /// Run one task in a plugin file, locally, without Redis: the plugin author's loop.
    Exec(ExecArgs),
    /// List the plugins of a directory: their tasks and WIT version, or why each was refused.
    Plugins(PluginsArgs),
    /// Publish a plugin to every worker following fleet deploys (`worker --fleet`).
    Deploy(DeployArgs),
    /// Return a deployed plugin to its previous version on every fleet worker.
    Rollback(RollbackArgs),
    /// Show the deployed plugin versions, and what each running worker serves.
    Deployments(BrokerArgs),
    /// Inspect and replay the dead-letter list: messages that could not be run.
    #[command(subcommand)]
    Dead(DeadCommand),
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// One line per entry, newest first (index, time, task, id, queue, reason).
    List {
        /// Entries to show.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// One entry in full, with its raw message.
    Show {
        /// Its index in `dead list`.
        index: usize,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Push entries' messages back onto their queues and remove the entries.
    Requeue {
        /// Indexes in `dead list`.
        #[arg(required_unless_present = "all")]
        index: Vec<usize>,
        /// Every entry.
        #[arg(long, conflicts_with = "index")]
        all: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Delete every entry.
    Purge {
        /// Confirm: the entries cannot be recovered.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        broker: BrokerArgs,
    },
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Queues to consume, comma-separated, highest priority first [default: celery].
    #[arg(short = 'Q', long = "queues", value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Tasks run at once [default: 4].
    #[arg(short = 'c', long, env = "CELERY_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Messages fetched ahead per slot, as Celery's worker_prefetch_multiplier: a worker holds
    /// at most concurrency x this many unstarted messages (1 suits long tasks) [default: 4].
    #[arg(long)]
    pub prefetch_multiplier: Option<usize>,
    /// Broker URL, e.g. redis://localhost:6379/0.
    #[arg(short = 'b', long, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,
    /// Result backend URL [default: the broker].
    #[arg(long, env = "CELERY_RESULT_BACKEND")]
    pub result_backend: Option<String>,
    /// Directory of plugin .wasm files [default: ./plugins.d].
    #[arg(short = 'p', long, env = "TASKHOST_PLUGINS")]
    pub plugins: Option<PathBuf>,
    /// Config file [default: ./taskhost.toml if present].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
    /// Node name, as Celery's --hostname (%h, %n, %d expand) [default: celery@%h].
    #[arg(short = 'n', long)]
    pub hostname: Option<String>,
    /// Seconds running tasks get to finish when the worker is asked to stop.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_grace: f64,
    /// Precompile cache directory [default: $TASKHOST_CACHE_DIR, else $XDG_CACHE_HOME/taskhost,
    /// else ~/.cache/taskhost].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Compile every plugin at load instead of using the precompile cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Follow fleet deploys: install the plugins `taskhost deploy` publishes through the broker.
    #[arg(long)]
    pub fleet: bool,
    /// Seconds without a heartbeat after which other workers take this one for dead and
    /// return its unfinished tasks to their queues [default: 10].
    #[arg(long)]
    pub heartbeat_lapse: Option<f64>,
    /// Times a task may be returned from dead workers before it is dead-lettered [default: 3].
    #[arg(long)]
    pub max_redeliveries: Option<u32>,
    /// Send Celery's monitoring events (task and worker events, for Flower and `celery
    /// events`) from the start; a monitor's `enable_events` turns them on too.
    #[arg(short = 'E', long)]
    pub task_events: bool,
    /// Serve Prometheus /metrics and /healthz on this address, e.g. 127.0.0.1:9808 (port 0
    /// picks a free one; the log says which).
    #[arg(long, env = "TASKHOST_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    /// Broker URL [default: CELERY_BROKER_URL, else a running `taskhost dev`].
    #[arg(short = 'b', long, env = "CELERY_BROKER_URL")]
    pub broker: Option<String>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The plugin file (.wasm); it is checked here before it is published.
    pub plugin: PathBuf,
    /// The plugin's name in every worker's directory [default: the file's stem].
    #[arg(long)]
    pub name: Option<String>,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The plugin name to return to its previous deployed version.
    pub name: String,
    #[command(flatten)]
    pub broker: BrokerArgs,
}

#[derive(Debug, Args)]
pub struct CallArgs {
    /// Task name, e.g. demo.add.
    pub name: String,
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
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
    /// Positional arguments, a JSON array.
    #[arg(long, default_value = "[]")]
    pub args: String,
    /// Keyword arguments, a JSON object.
    #[arg(long, default_value = "{}")]
    pub kwargs: String,
    /// Run as this retry of the task.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
    /// Config file whose grants apply [default: ./taskhost.toml if present].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PluginsArgs {
    /// Directory of plugin .wasm files.
    pub dir: PathBuf,
    /// Config file whose grants apply [default: ./taskhost.toml if present].
    #[arg(long, env = "TASKHOST_CONFIG")]
    pub config: Option<PathBuf>,
}

/// Parses the command line, sets up logging and runs the command; returns the exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Worker(_) | Command::Dev(_) => LogLevel::Info,
        _ => LogLevel::Warning,
    };
    init_logging(cli.loglevel.unwrap_or(default_level), cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
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
            std::process::ExitCode::FAILURE
        }
    }
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
        // and target, as log shippers index them.
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

async fn run(command: Command) -> anyhow::Result<std::process::ExitCode> {
    match command {
        Command::Worker(args) => {
            let config = worker_config(&args, None)?;
            let signals = signals();
            worker::run(config, signals.nth(1), signals.nth(2)).await?;
        }
        Command::Dev(args) => run_dev(&args).await?,
        Command::Call(args) => return call(&args).await,
        Command::Exec(args) => return exec(&args).await,
        Command::Plugins(args) => return list_plugins(&args).await,
        Command::Deploy(args) => deploy(&args).await?,
        Command::Rollback(args) => rollback(&args).await?,
        Command::Deployments(args) => deployments(&args).await?,
        Command::Dead(command) => dead(command).await?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Counts SIGTERM and Ctrl-C (SIGINT) signals.
#[derive(Clone)]
struct Signals(tokio::sync::watch::Receiver<u32>);

/// Starts counting stop signals.
fn signals() -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for SIGTERM and SIGINT; stop the worker with SIGKILL");
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    Signals(rx)
}

impl Signals {
    /// Completes once `n` signals have come.
    fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|count| *count >= n).await;
        }
    }
}

/// Resolves a worker's settings: flags (and Celery's environment variables) first, then the
/// config file. `dev_broker` stands in when no broker is configured.
fn worker_config(args: &WorkerArgs, dev_broker: Option<&str>) -> anyhow::Result<WorkerConfig> {
    let (file, path) = FileConfig::load(args.config.as_deref())?;
    let grants = file.grants(&|var| std::env::var(var).ok())?;
    let section = &file.worker;
    let broker_url = args
        .broker
        .clone()
        .or_else(|| section.broker_url.clone())
        .or_else(|| dev_broker.map(str::to_owned))
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL (or try `taskhost dev`)")?;
    broker::client(&broker_url)?;
    let backend_url = args
        .result_backend
        .clone()
        .or_else(|| section.result_backend.clone())
        .unwrap_or_else(|| broker_url.clone());
    broker::client(&backend_url).context("result backend")?;
    let queues = if args.queues.is_empty() {
        section
            .queues
            .clone()
            .unwrap_or_else(|| vec!["celery".into()])
    } else {
        args.queues.clone()
    };
    if let Some(bad) = queues
        .iter()
        .find(|q| q.trim().is_empty() || q.contains('\n'))
    {
        bail!("invalid queue name {bad:?}");
    }
    let concurrency = args.concurrency.or(section.concurrency).unwrap_or(4);
    if concurrency == 0 || concurrency > 10_000 {
        bail!("concurrency must be between 1 and 10000, got {concurrency}");
    }
    let prefetch_multiplier = args
        .prefetch_multiplier
        .or(section.prefetch_multiplier)
        .unwrap_or(4);
    if prefetch_multiplier == 0 || prefetch_multiplier > 1_000 {
        bail!("--prefetch-multiplier must be between 1 and 1000, got {prefetch_multiplier}");
    }
    let plugins_dir = match (&args.plugins, &section.plugins) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => relative_to_config(dir, path.as_deref()),
        (None, None) => PathBuf::from("plugins.d"),
    };
    if !plugins_dir.is_dir() {
        bail!(
            "plugin directory {} does not exist: pass --plugins DIR (a folder of .wasm files)",
            plugins_dir.display()
        );
    }
    // Absolute, as the file-system watcher reports paths: a relative directory would never
    // match them, and files dropped in would not be loaded.
    let plugins_dir = plugins_dir
        .canonicalize()
        .with_context(|| format!("plugin directory {}", plugins_dir.display()))?;
    let cache_dir = if args.no_cache {
        None
    } else {
        args.cache_dir
            .clone()
            .or_else(|| {
                section
                    .cache_dir
                    .as_deref()
                    .map(|d| relative_to_config(d, path.as_deref()))
            })
            .or_else(Cache::default_dir)
    };
    let lapse = args
        .heartbeat_lapse
        .or(section.heartbeat_lapse)
        .unwrap_or(10.0);
    if !lapse.is_finite() || lapse < 1.0 {
        bail!("--heartbeat-lapse must be at least 1 second, got {lapse}");
    }
    let heartbeat_lapse = Duration::from_secs_f64(lapse);
    if !args.shutdown_grace.is_finite() || args.shutdown_grace < 0.0 {
        bail!(
            "--shutdown-grace must be a number of seconds, got {}",
            args.shutdown_grace
        );
    }
    Ok(WorkerConfig {
        node: node::node_name(args.hostname.as_deref().or(section.hostname.as_deref())),
        queues,
        concurrency,
        prefetch_multiplier,
        broker_url,
        backend_url,
        result_expires: section.result_expires.unwrap_or(results::DEFAULT_EXPIRES),
        plugins_dir,
        grants,
        config_path: path,
        cache_dir,
        fleet: args.fleet || section.fleet.unwrap_or(false),
        stack_bytes: file.stack_bytes()?,
        heartbeat_lapse,
        max_redeliveries: args
            .max_redeliveries
            .or(section.max_redeliveries)
            .unwrap_or(3),
        task_overrides: Arc::new(file.task_overrides()?),
        shutdown_grace: Duration::from_secs_f64(args.shutdown_grace),
        task_events: args.task_events || section.task_events.unwrap_or(false),
        metrics_addr: args
            .metrics_addr
            .as_deref()
            .or(section.metrics_addr.as_deref())
            .map(|addr| {
                addr.parse::<std::net::SocketAddr>().with_context(|| {
                    format!("--metrics-addr {addr:?} is not HOST:PORT (an IP address and a port)")
                })
            })
            .transpose()?,
    })
}

fn relative_to_config(dir: &Path, config: Option<&Path>) -> PathBuf {
    match config.and_then(Path::parent) {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir.to_path_buf(),
    }
}

async fn run_dev(args: &WorkerArgs) -> anyhow::Result<()> {
    let (file, _) = FileConfig::load(args.config.as_deref())?;
    let configured = args.broker.is_some() || file.worker.broker_url.is_some();
    let redis = if configured {
        None
    } else {
        Some(dev::PrivateRedis::start().await?)
    };
    let dev_url = redis.as_ref().map(dev::PrivateRedis::url);
    let config = worker_config(args, dev_url.as_deref())?;
    let _state = dev::StateFile::write(&config.broker_url)?;
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| {
            let cwd = std::env::current_dir().ok()?;
            Some(p.strip_prefix(&cwd).map(Path::to_path_buf).unwrap_or(p))
        })
        .map_or_else(|| "taskhost".to_owned(), |p| p.display().to_string());
    let origin = if redis.is_some() {
        "private redis-server, stops with this process"
    } else {
        "configured"
    };
    eprintln!(
        "\ntaskhost dev: broker {} ({origin}), plugins from {}\n\
         send a task from another terminal:\n    {exe} call demo.add --args '[2,3]' --wait\n\
         stop with Ctrl-C\n",
        broker::redact(&config.broker_url),
        config.plugins_dir.display()
    );
    let signals = signals();
    worker::run(config, signals.nth(1), signals.nth(2)).await
}

async fn call(args: &CallArgs) -> anyhow::Result<std::process::ExitCode> {
    let task_args: Value = serde_json::from_str(&args.args)
        .with_context(|| format!("--args is not JSON: {:?}", args.args))?;
    if !task_args.is_array() {
        bail!("--args must be a JSON array, e.g. '[2, 3]'");
    }
    let kwargs: Value = serde_json::from_str(&args.kwargs)
        .with_context(|| format!("--kwargs is not JSON: {:?}", args.kwargs))?;
    if !kwargs.is_object() {
        bail!("--kwargs must be a JSON object, e.g. '{{\"x\": 1}}'");
    }
    let seconds = |flag: &str, v: Option<f64>| -> anyhow::Result<Option<Duration>> {
        match v {
            None => Ok(None),
            Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
            Some(s) => bail!("{flag} must be a non-negative number of seconds, got {s}"),
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let countdown = seconds("--countdown", args.countdown)?;
    let expires = seconds("--expires", args.expires)?;
    let timeout = seconds("--timeout", Some(args.timeout))?.unwrap_or(Duration::from_secs(60));
    let broker_url = args
        .broker
        .clone()
        .or_else(dev::running_broker)
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL (or start `taskhost dev`)")?;
    let backend_url = args
        .result_backend
        .clone()
        .unwrap_or_else(|| broker_url.clone());
    let task = NewTask {
        id: uuid::Uuid::new_v4().to_string(),
        task: args.name.clone(),
        args: task_args,
        kwargs,
        queue: args.queue.clone(),
        priority: args.priority,
        eta: countdown.map(|d| now + d),
        expires: expires.map(|d| now + d),
    };
    let client = broker::client(&broker_url)?;
    let mut conn = broker::manager(&client, &broker_url).await?;
    let waiter = if args.wait {
        let backend = Backend::connect(&backend_url, results::DEFAULT_EXPIRES).await?;
        Some(backend.subscribe(&task.id).await?)
    } else {
        None
    };
    broker::publish(&mut conn, &task.queue, task.priority, &task.encode()).await?;
    let Some(waiter) = waiter else {
        println!("{}", task.id);
        return Ok(std::process::ExitCode::SUCCESS);
    };
    let doc = waiter.wait(timeout).await?;
    let status = doc.get("status").and_then(Value::as_str).unwrap_or("?");
    let result = doc.get("result").cloned().unwrap_or(Value::Null);
    if status == "SUCCESS" {
        println!("{result}");
        return Ok(std::process::ExitCode::SUCCESS);
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
    eprintln!("{status} {}: {kind}: {message}", task.id);
    Ok(std::process::ExitCode::FAILURE)
}

/// A small sandbox for commands that run one plugin at a time.
fn local_sandbox(file: &FileConfig, grants: &GrantTable) -> anyhow::Result<Arc<Sandbox>> {
    Ok(Arc::new(Sandbox::new(&SandboxOptions {
        max_instances: 4,
        max_memory_bytes: grants.max_memory_bytes(),
        max_table_elements: grants.max_table_elements(),
        stack_bytes: file.stack_bytes()?,
    })?))
}

async fn exec(args: &ExecArgs) -> anyhow::Result<std::process::ExitCode> {
    let task_args: Value = serde_json::from_str(&args.args)
        .with_context(|| format!("--args is not JSON: {:?}", args.args))?;
    let kwargs: Value = serde_json::from_str(&args.kwargs)
        .with_context(|| format!("--kwargs is not JSON: {:?}", args.kwargs))?;
    if !task_args.is_array() || !kwargs.is_object() {
        bail!("--args must be a JSON array and --kwargs a JSON object");
    }
    if !args.plugin.is_file() {
        bail!("plugin file {} does not exist", args.plugin.display());
    }
    let (file, _) = FileConfig::load(args.config.as_deref())?;
    let grants = file.grants(&|var| std::env::var(var).ok())?;
    let sandbox = local_sandbox(&file, &grants)?;
    let plugin = load_one(&sandbox, &args.plugin, &grants).await?;
    let Some(spec) = plugin.tasks.iter().find(|t| t.name == args.name) else {
        let served: Vec<&str> = plugin.tasks.iter().map(|t| t.name.as_str()).collect();
        bail!(
            "{} does not serve task {:?} (it serves: {})",
            args.plugin.display(),
            args.name,
            served.join(", ")
        );
    };
    let id = uuid::Uuid::new_v4().to_string();
    let plugin_grants = grants.for_plugin(&plugin.name);
    let (soft, hard) = worker::time_limits((None, None), &plugin_grants.limits, &spec.defaults);
    let task = Task {
        id: id.clone(),
        name: args.name.clone(),
        args: task_args.to_string(),
        kwargs: kwargs.to_string(),
        retries: args.retries,
        root_id: Some(id.clone()),
        parent_id: None,
        soft_deadline_ms: soft.map(worker::deadline_ms),
        hostname: node::node_name(None),
    };
    let scope = Scope {
        plugin: plugin.name.clone(),
        task_name: args.name.clone(),
        task_id: id.as_str().into(),
        grants: plugin_grants,
        progress: None,
    };
    match sandbox.run(&plugin.pre, scope, &task, hard).await {
        Outcome::Success(json) => {
            println!("{json}");
            Ok(std::process::ExitCode::SUCCESS)
        }
        Outcome::Failure(exc) => {
            eprintln!("FAILURE {}: {}", exc.kind, exc.message);
            Ok(std::process::ExitCode::FAILURE)
        }
        Outcome::Retry { countdown, reason } => {
            let when =
                countdown.map_or_else(|| "after its backoff".to_owned(), |c| format!("in {c} s"));
            eprintln!(
                "RETRY requested ({when}; rerun with --retries {}): {}: {}",
                args.retries + 1,
                reason.kind,
                reason.message
            );
            Ok(std::process::ExitCode::from(3))
        }
        Outcome::Reject(reason) => {
            eprintln!("REJECTED: {reason}");
            Ok(std::process::ExitCode::FAILURE)
        }
    }
}

/// Loads one plugin file for a command (with the default precompile cache).
async fn load_one(
    sandbox: &Arc<Sandbox>,
    path: &Path,
    grants: &GrantTable,
) -> anyhow::Result<plugins::Plugin> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cache = Cache::default_dir().and_then(|dir| Cache::new(&dir).ok());
    plugins::load(sandbox, cache.as_ref(), path, bytes, grants)
        .await
        .map_err(|e| anyhow::anyhow!("plugin {} refused: {e}", path.display()))
}

async fn list_plugins(args: &PluginsArgs) -> anyhow::Result<std::process::ExitCode> {
    let (file, _) = FileConfig::load(args.config.as_deref())?;
    let grants = file.grants(&|var| std::env::var(var).ok())?;
    let sandbox = local_sandbox(&file, &grants)?;
    let cache = Cache::default_dir().and_then(|dir| Cache::new(&dir).ok());
    let grants = Arc::new(arc_swap::ArcSwap::from_pointee(grants));
    let live = Live::open(sandbox, cache, &args.dir, grants).await?;
    let registry = live.registry();
    for plugin in registry.plugins() {
        println!(
            "{}  version {}  wit {}@{}  {}",
            plugin.name,
            plugin.version,
            crate::sandbox::WIT_PACKAGE,
            plugin.wit_version,
            plugin.path.display()
        );
        for task in &plugin.tasks {
            println!("    {}{}", task.name, describe_defaults(&task.defaults));
        }
    }
    let refused = live.refused();
    for (path, reason) in &refused {
        println!("{}  REFUSED: {reason}", path.display());
    }
    if registry.plugins().next().is_none() && refused.is_empty() {
        println!("no .wasm files in {}", args.dir.display());
    }
    Ok(if refused.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// The broker for an operator's command: the flag or CELERY_BROKER_URL, else a running
/// `taskhost dev`.
async fn fleet_connection(
    args: &BrokerArgs,
) -> anyhow::Result<(redis::Client, redis::aio::ConnectionManager)> {
    let url = args
        .broker
        .clone()
        .or_else(dev::running_broker)
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL")?;
    let client = broker::client(&url)?;
    let conn = broker::manager(&client, &url).await?;
    Ok((client, conn))
}

async fn deploy(args: &DeployArgs) -> anyhow::Result<()> {
    let name = match &args.name {
        Some(name) => name.clone(),
        None => plugins::plugin_name(&args.plugin).to_string(),
    };
    deploy::check_name(&name)?;
    // Check it here, so a plugin no worker could load is never published.
    let grants = GrantTable::default();
    let sandbox = local_sandbox(&FileConfig::default(), &grants)?;
    let plugin = load_one(&sandbox, &args.plugin, &grants).await?;
    let bytes = std::fs::read(&args.plugin)
        .with_context(|| format!("cannot read {}", args.plugin.display()))?;
    let (client, mut conn) = fleet_connection(&args.broker).await?;
    let digest = deploy::publish(&mut conn, &deploy::channel(&client), &name, &bytes).await?;
    println!(
        "deployed {name} version {} (sha256 {digest}), tasks: {}",
        plugin.version,
        plugin
            .tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

async fn rollback(args: &RollbackArgs) -> anyhow::Result<()> {
    let (client, mut conn) = fleet_connection(&args.broker).await?;
    let (from, to) = deploy::rollback(&mut conn, &deploy::channel(&client), &args.name).await?;
    println!(
        "rolled back {} from {} to {}",
        args.name,
        &from[..12],
        &to[..12]
    );
    Ok(())
}

async fn deployments(args: &BrokerArgs) -> anyhow::Result<()> {
    let (_, mut conn) = fleet_connection(args).await?;
    let status = deploy::deployments(&mut conn).await?;
    println!("deployed (fleet):");
    if status.deployed.is_empty() {
        println!("    nothing deployed with `taskhost deploy` yet");
    }
    for (name, (digest, kept)) in &status.deployed {
        println!(
            "    {name}  sha256 {}  ({kept} version(s) kept for rollback)",
            &digest[..12]
        );
    }
    println!("workers:");
    if status.workers.is_empty() {
        println!("    no running worker reports");
    }
    for (node, running) in &status.workers {
        let plugins: Vec<String> = running
            .iter()
            .filter(|(plugin, _)| *plugin != "-")
            .map(|(plugin, version)| format!("{plugin} {version}"))
            .collect();
        println!(
            "    {node}: {}",
            if plugins.is_empty() {
                "no plugins".into()
            } else {
                plugins.join(", ")
            }
        );
    }
    Ok(())
}

fn describe_defaults(d: &crate::sandbox::TaskDefaults) -> String {
    let mut parts = Vec::new();
    if let Some(q) = &d.queue {
        parts.push(format!("queue={q}"));
    }
    if let Some(n) = d.max_retries {
        parts.push(format!("max_retries={n}"));
    }
    if let Some(b) = d.retry_backoff {
        parts.push(format!("retry_backoff={b}"));
    }
    if let Some(b) = d.retry_backoff_max {
        parts.push(format!("retry_backoff_max={b}"));
    }
    if let Some(j) = d.retry_jitter {
        parts.push(format!("retry_jitter={j}"));
    }
    if let Some(t) = d.soft_time_limit {
        parts.push(format!("soft_time_limit={t}"));
    }
    if let Some(t) = d.time_limit {
        parts.push(format!("time_limit={t}"));
    }
    if let Some(r) = &d.rate_limit {
        parts.push(format!("rate_limit={r}"));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("  ({})", parts.join(", "))
    }
}

async fn dead(command: DeadCommand) -> anyhow::Result<()> {
    match command {
        DeadCommand::List { limit, broker } => {
            let (_, mut conn) = fleet_connection(&broker).await?;
            let total = deadletter::count(&mut conn).await?;
            for entry in deadletter::list(&mut conn, limit).await? {
                println!("{}", entry.summary());
            }
            println!(
                "{total} dead-letter entr{}",
                if total == 1 { "y" } else { "ies" }
            );
        }
        DeadCommand::Show { index, broker } => {
            let (_, mut conn) = fleet_connection(&broker).await?;
            let entry = deadletter::show(&mut conn, index).await?;
            let shown = serde_json::to_string_pretty(&entry.doc).unwrap_or(entry.raw);
            println!("{shown}");
        }
        DeadCommand::Requeue { index, all, broker } => {
            let (_, mut conn) = fleet_connection(&broker).await?;
            let mut indexes = if all {
                (0..deadletter::count(&mut conn).await?).collect()
            } else {
                index
            };
            // Highest first: removing an entry shifts the ones after it.
            indexes.sort_unstable_by(|a, b| b.cmp(a));
            indexes.dedup();
            for index in indexes {
                let target = deadletter::requeue(&mut conn, index).await?;
                println!("requeued entry {index} onto {}", broker::queue_of(&target));
            }
        }
        DeadCommand::Purge { yes, broker } => {
            if !yes {
                bail!("purge deletes every dead-letter entry for good: add --yes to confirm");
            }
            let (_, mut conn) = fleet_connection(&broker).await?;
            let purged = deadletter::purge(&mut conn).await?;
            println!("purged {purged} dead-letter entries");
        }
    }
    Ok(())
}
