//! A worker's settings, resolved: flags first (and Celery's environment variables, which clap
//! reads into the same flags), then `taskhost.toml`, then the defaults; every value checked
//! before anything connects or loads.

use super::file::{FileConfig, TaskSection};
use super::grants::GrantTable;
use anyhow::{Context as _, bail};
use clap::Args;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Celery's default `result_expires`: one day.
pub const DEFAULT_RESULT_EXPIRES: u64 = 86_400;

/// Operator overrides of tasks' declared settings, by task name (`[tasks."NAME"]`).
/// Dead-letter entries kept by default: plenty to inspect, bounded in Redis's memory.
pub const DEFAULT_DEAD_LETTER_MAX: u64 = 100_000;

pub type TaskOverrides = Arc<HashMap<String, TaskSection>>;

/// The worker's flags, as `taskhost worker` and `taskhost dev` take them.
#[derive(Debug, Args)]
pub struct WorkerFlags {
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
    /// Do not run the `[schedule]` entries from this worker (by default every worker runs
    /// them; each tick is sent once across the fleet).
    #[arg(long)]
    pub no_beat: bool,
    /// Hard time limit of every task, in seconds, as Celery's `worker --time-limit`: over the
    /// `[limits] time_limit` of taskhost.toml; a plugin's own section and the task's
    /// declaration may tighten it [default: 3600].
    #[arg(long, value_name = "SECONDS")]
    pub time_limit: Option<f64>,
    /// Soft time limit of every task, in seconds, as Celery's `worker --soft-time-limit`: the
    /// task is told its deadline (over `[limits] soft_time_limit`).
    #[arg(long, value_name = "SECONDS")]
    pub soft_time_limit: Option<f64>,
    /// Run between MIN and MAX tasks at once, growing while messages wait and shrinking after
    /// 30 s with fewer, as Celery's `--autoscale MAX,MIN` (over -c).
    #[arg(long, value_name = "MAX,MIN")]
    pub autoscale: Option<String>,
    #[command(flatten)]
    pub celery: super::compat::CeleryFlags,
    /// A test hook: how long the autoscaler waits with fewer messages than slots before it
    /// shrinks, in milliseconds [default: 30000, Celery's AUTOSCALE_KEEPALIVE].
    #[arg(long, env = "TASKHOST_TEST_AUTOSCALE_KEEPALIVE_MS", hide = true)]
    pub test_autoscale_keepalive_ms: Option<u64>,
    /// A test hook: the instance pool's size. By default it is concurrency + 2, which the
    /// worker never fills; a smaller pool shows what a task that finds it full does.
    #[arg(long, env = "TASKHOST_TEST_POOL_INSTANCES", hide = true)]
    pub test_pool_instances: Option<u32>,
}

/// Everything a worker needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub node: String,
    pub queues: Vec<String>,
    pub concurrency: usize,
    /// Unstarted messages held per slot, at most (Celery's `worker_prefetch_multiplier`).
    pub prefetch_multiplier: usize,
    pub broker_url: String,
    pub backend_url: String,
    pub result_expires: u64,
    pub plugins_dir: PathBuf,
    pub grants: GrantTable,
    /// The config file in use, watched for changes to the grants.
    pub config_path: Option<PathBuf>,
    /// The precompile cache directory, if any.
    pub cache_dir: Option<PathBuf>,
    /// Follow fleet deploys published through the broker.
    pub fleet: bool,
    /// Which deploys a fleet worker installs (`[fleet]`).
    pub fleet_trust: super::FleetTrust,
    /// The file's `[worker]` section as the worker started with it: a reload that changes it
    /// is refused (it needs a restart).
    pub worker_section: super::file::WorkerSection,
    /// The WebAssembly stack of every instance.
    pub stack_bytes: usize,
    /// What one component may take of the instance pool.
    pub component_caps: super::ComponentCaps,
    /// A worker whose heartbeat is older than this is taken for dead.
    pub heartbeat_lapse: Duration,
    /// Returns from dead workers after which a message is dead-lettered.
    pub max_redeliveries: u32,
    /// Dead-letter entries kept; the oldest beyond are dropped and counted.
    pub dead_letter_max: u64,
    /// Replicas that must hold a batch's states before its messages are acknowledged.
    pub wait_replicas: u32,
    /// `[tasks."NAME"]` sections.
    pub task_overrides: TaskOverrides,
    /// The periodic tasks this worker sends; none with `--no-beat`, which also ignores the
    /// schedule on a config reload.
    pub schedule: Option<Vec<super::schedule::Entry>>,
    /// How long running tasks may take to finish once a stop is asked for.
    pub shutdown_grace: Duration,
    /// Send Celery's monitoring events from the start.
    pub task_events: bool,
    /// Where to serve /metrics and /healthz.
    pub metrics_addr: Option<SocketAddr>,
    /// Where spans go; none when tracing is off.
    pub tracing: Option<super::TracingConfig>,
    /// Instances the pool holds: concurrency + 2 (plugin loads use the two spare), unless a
    /// test shrinks it.
    pub pool_instances: u32,
    /// `--autoscale`: the slots grow and shrink between its bounds (`concurrency` is its
    /// maximum).
    pub autoscale: Option<Autoscale>,
    /// `--time-limit` and `--soft-time-limit`, laid over `[limits]` at start and at each
    /// config reload.
    pub limit_flags: LimitFlags,
    /// Plugins whose sources `taskhost dev --watch` serves live (by plugin name), granted at
    /// start and at each config reload.
    pub dev_sources: Vec<(String, PathBuf)>,
    /// Optimising for a worker; fast for `taskhost dev`.
    pub compiler: Compiler,
}

impl WorkerConfig {
    /// Lets plugin `name` read its project's sources in `dir` live (`taskhost dev --watch`).
    pub fn read_sources_live(&mut self, name: &str, dir: &Path) {
        self.dev_sources.push((name.to_owned(), dir.to_path_buf()));
        self.grants = std::mem::take(&mut self.grants).with_dev_sources(name, dir);
    }
}

/// How plugins are compiled to machine code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiler {
    /// Cranelift, optimising (with the incremental cache, if any): what a worker runs.
    Optimizing,
    /// Winch, wasmtime's baseline compiler: a 13 MB JavaScript plugin compiles in 1 s instead
    /// of 6 (2 with the incremental cache), and runs slower. `taskhost dev`'s, where an edit's
    /// wait is what counts. Its code is cached apart: the engine fingerprint differs.
    Fast,
}

/// Celery's `--autoscale MAX,MIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscale {
    pub max: usize,
    pub min: usize,
    /// How long fewer messages than slots must last before a shrink.
    pub keepalive: Duration,
}

impl Autoscale {
    /// Celery's AUTOSCALE_KEEPALIVE.
    pub const KEEPALIVE: Duration = Duration::from_secs(30);

    /// `--autoscale`, if given (with the test hook's keepalive).
    fn of(flags: &WorkerFlags) -> anyhow::Result<Option<Self>> {
        let Some(text) = flags.autoscale.as_deref() else {
            return Ok(None);
        };
        let parsed = Self::parse(text)?;
        Ok(Some(Self {
            keepalive: flags
                .test_autoscale_keepalive_ms
                .map_or(parsed.keepalive, Duration::from_millis),
            ..parsed
        }))
    }

    /// Reads `MAX,MIN` (or `MAX` alone, MIN 0 as in Celery, here 1: a worker keeps one slot).
    fn parse(text: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "--autoscale takes MAX,MIN (e.g. 10,3: at most 10 tasks at once, at least 3),                  got {text:?}"
            )
        };
        let number = |n: &str| n.trim().parse::<usize>().map_err(|_| bad());
        let (max, min) = match text.split_once(',') {
            Some((max, min)) => (number(max)?, number(min)?),
            None => (number(text)?, 1),
        };
        if max == 0 || max > 10_000 || min > max {
            bail!("--autoscale MAX,MIN needs 1 <= MIN <= MAX <= 10000, got {text:?}");
        }
        Ok(Self {
            max,
            min: min.max(1),
            keepalive: Self::KEEPALIVE,
        })
    }
}

/// The worker's `--time-limit` and `--soft-time-limit`, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitFlags {
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
}

impl LimitFlags {
    /// The flags given, checked.
    fn of(flags: &WorkerFlags) -> anyhow::Result<Self> {
        for (flag, value) in [
            ("--time-limit", flags.time_limit),
            ("--soft-time-limit", flags.soft_time_limit),
        ] {
            if let Some(v) = value.filter(|v| !v.is_finite() || *v <= 0.0) {
                bail!("{flag} must be a positive number of seconds, got {v}");
            }
        }
        Ok(Self {
            time_limit: flags.time_limit,
            soft_time_limit: flags.soft_time_limit,
        })
    }

    /// `file` with these flags over its `[limits]`.
    pub fn over(&self, mut file: FileConfig) -> FileConfig {
        file.limits.time_limit = self.time_limit.or(file.limits.time_limit);
        file.limits.soft_time_limit = self.soft_time_limit.or(file.limits.soft_time_limit);
        file
    }
}

impl WorkerConfig {
    /// Resolves `flags` over the config file they name (or `./taskhost.toml`). `dev_broker`
    /// stands in when no broker is configured.
    ///
    /// # Errors
    /// The first setting that is missing or invalid, named as the operator wrote it.
    pub fn resolve(flags: &WorkerFlags, dev_broker: Option<&str>) -> anyhow::Result<Self> {
        let (file, path) = FileConfig::load(flags.config.as_deref())?;
        let limit_flags = LimitFlags::of(flags)?;
        let file = limit_flags.over(file);
        let section = &file.worker;
        let (broker_url, backend_url) = urls(flags, &file, dev_broker)?;
        let queues = queues(flags, section)?;
        let autoscale = Autoscale::of(flags)?;
        let concurrency = match autoscale {
            Some(a) => a.max,
            None => flags.concurrency.or(section.concurrency).unwrap_or(4),
        };
        if concurrency == 0 || concurrency > 10_000 {
            bail!("concurrency must be between 1 and 10000, got {concurrency}");
        }
        let prefetch_multiplier = flags
            .prefetch_multiplier
            .or(section.prefetch_multiplier)
            .unwrap_or(4);
        if prefetch_multiplier == 0 || prefetch_multiplier > 1_000 {
            bail!("--prefetch-multiplier must be between 1 and 1000, got {prefetch_multiplier}");
        }
        let lapse = flags
            .heartbeat_lapse
            .or(section.heartbeat_lapse)
            .unwrap_or(10.0);
        if !lapse.is_finite() || lapse < 1.0 {
            bail!("--heartbeat-lapse must be at least 1 second, got {lapse}");
        }
        if !flags.shutdown_grace.is_finite() || flags.shutdown_grace < 0.0 {
            bail!(
                "--shutdown-grace must be a number of seconds, got {}",
                flags.shutdown_grace
            );
        }
        Ok(Self {
            node: crate::node::node_name(flags.hostname.as_deref().or(section.hostname.as_deref())),
            queues,
            concurrency,
            prefetch_multiplier,
            broker_url,
            backend_url,
            result_expires: section.result_expires.unwrap_or(DEFAULT_RESULT_EXPIRES),
            plugins_dir: plugins_dir(flags, &file, path.as_deref())?,
            grants: file.grants(&|var| std::env::var(var).ok())?,
            cache_dir: cache_dir(flags, &file, path.as_deref()),
            config_path: path,
            fleet: flags.fleet || section.fleet.unwrap_or(false),
            fleet_trust: file.fleet_trust()?,
            worker_section: file.worker.clone(),
            stack_bytes: file.stack_bytes()?,
            component_caps: file.component_caps()?,
            heartbeat_lapse: Duration::from_secs_f64(lapse),
            max_redeliveries: flags
                .max_redeliveries
                .or(section.max_redeliveries)
                .unwrap_or(3),
            dead_letter_max: match section.dead_letter_max {
                Some(0) => bail!("[worker] dead_letter_max must be at least 1"),
                max => max.unwrap_or(DEFAULT_DEAD_LETTER_MAX),
            },
            wait_replicas: section.wait_replicas.unwrap_or(0),
            task_overrides: Arc::new(file.task_overrides()?),
            schedule: Some(file.schedule()?).filter(|_| !flags.no_beat),
            shutdown_grace: Duration::from_secs_f64(flags.shutdown_grace),
            task_events: flags.task_events || section.task_events.unwrap_or(false),
            metrics_addr: metrics_addr(flags, &file)?,
            tracing: super::TracingConfig::resolve(&file.tracing, &|var| std::env::var(var).ok())?,
            pool_instances: match flags.test_pool_instances {
                Some(n) if n > 0 => n,
                _ => u32::try_from(concurrency)
                    .unwrap_or(u32::MAX)
                    .saturating_add(2),
            },
            autoscale,
            limit_flags,
            dev_sources: Vec::new(),
            compiler: Compiler::Optimizing,
        })
    }
}

/// The queues to consume: `-Q`, else `[worker] queues`, else `celery`.
fn queues(
    flags: &WorkerFlags,
    section: &super::file::WorkerSection,
) -> anyhow::Result<Vec<String>> {
    let queues = if flags.queues.is_empty() {
        section
            .queues
            .clone()
            .unwrap_or_else(|| vec!["celery".into()])
    } else {
        flags.queues.clone()
    };
    if let Some(bad) = queues.iter().find(|q| !is_queue_name(q)) {
        bail!("invalid queue name {bad:?}");
    }
    Ok(queues)
}

/// Whether `name` can be a queue: not blank, one line.
pub fn is_queue_name(name: &str) -> bool {
    !name.trim().is_empty() && !name.contains('\n')
}

/// The broker and backend URLs, each checked to be one a Redis client can open.
fn urls(
    flags: &WorkerFlags,
    file: &FileConfig,
    dev_broker: Option<&str>,
) -> anyhow::Result<(String, String)> {
    let section = &file.worker;
    let options = |o: &Option<super::file::TransportOptions>, url: &str| {
        o.as_ref()
            .map_or_else(|| url.to_owned(), |o| o.applied_to(url))
    };
    let broker_url = flags
        .broker
        .clone()
        .or_else(|| section.broker_url.clone())
        .or_else(|| dev_broker.map(str::to_owned))
        .context("no broker: pass --broker redis://HOST:PORT/DB or set CELERY_BROKER_URL (or try `taskhost dev`)")?;
    let broker_url = options(&section.broker_transport_options, &broker_url);
    crate::redis::client(&broker_url)?;
    let backend_url = flags
        .result_backend
        .clone()
        .or_else(|| section.result_backend.clone())
        .map_or_else(
            || broker_url.clone(),
            |url| options(&section.result_backend_transport_options, &url),
        );
    crate::redis::client(&backend_url).context("result backend")?;
    Ok((broker_url, backend_url))
}

/// The plugin directory: it must exist. Absolute, as the file-system watcher reports paths: a
/// relative directory would never match them, and files dropped in would not be loaded.
/// The plugin directory the flags or the config file name (`./plugins.d` by default), whether
/// or not it exists.
pub fn configured_plugins_dir(
    flags: &WorkerFlags,
    file: &FileConfig,
    config: Option<&Path>,
) -> PathBuf {
    match (&flags.plugins, &file.worker.plugins) {
        (Some(dir), _) => dir.clone(),
        (None, Some(dir)) => relative_to_config(dir, config),
        (None, None) => PathBuf::from("plugins.d"),
    }
}

fn plugins_dir(
    flags: &WorkerFlags,
    file: &FileConfig,
    config: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let dir = configured_plugins_dir(flags, file, config);
    if !dir.is_dir() {
        bail!(
            "plugin directory {} does not exist: pass --plugins DIR (a folder of .wasm files)",
            dir.display()
        );
    }
    dir.canonicalize()
        .with_context(|| format!("plugin directory {}", dir.display()))
}

fn cache_dir(flags: &WorkerFlags, file: &FileConfig, config: Option<&Path>) -> Option<PathBuf> {
    if flags.no_cache {
        return None;
    }
    flags
        .cache_dir
        .clone()
        .or_else(|| {
            file.worker
                .cache_dir
                .as_deref()
                .map(|d| relative_to_config(d, config))
        })
        .or_else(default_cache_dir)
}

/// The default precompile cache directory: `$TASKHOST_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/taskhost`, else `~/.cache/taskhost`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TASKHOST_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("taskhost"))
}

fn metrics_addr(flags: &WorkerFlags, file: &FileConfig) -> anyhow::Result<Option<SocketAddr>> {
    flags
        .metrics_addr
        .as_deref()
        .or(file.worker.metrics_addr.as_deref())
        .map(|addr| {
            addr.parse::<SocketAddr>().with_context(|| {
                format!("--metrics-addr {addr:?} is not HOST:PORT (an IP address and a port)")
            })
        })
        .transpose()
}

/// `dir` from the config file: relative to the file's own directory.
fn relative_to_config(dir: &Path, config: Option<&Path>) -> PathBuf {
    match config.and_then(Path::parent) {
        Some(base) if dir.is_relative() => base.join(dir),
        _ => dir.to_path_buf(),
    }
}
