//! The operator's configuration file, `taskhost.toml`: worker settings and what each plugin is
//! granted. Parsed strictly (unknown keys are errors) and fully validated, `${VAR}` references
//! resolved, before anything connects or loads.
//!
//! ```toml
//! [worker]
//! concurrency = 4
//! queues = ["celery"]
//!
//! [limits]            # every plugin's defaults
//! memory_mb = 128
//!
//! [plugins.crucible]  # the plugin file crucible.wasm
//! allow_http = ["${EXECUTOR_SERVICE_URL}", "${STORAGE_SERVICE_URL:-http://127.0.0.1:8002}"]
//! config = { executor_service_url = "${EXECUTOR_SERVICE_URL}" }
//!
//! [schedule.cleanup]  # a periodic task (see `schedule`)
//! task = "tasks.cleanup_old_evaluations"
//! every = "1h"
//! ```
//!
//! A plugin is named by its file's stem, which the operator controls; a plugin cannot pick the
//! name it is granted under. A plugin with no section gets no network and the default limits
//! (see `grants`).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where the configuration went wrong, naming the file and the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Syntax(String),
    #[error(
        "{place}: environment variable {var} is not set (write ${{{var}:-default}} for a default)"
    )]
    MissingEnv { place: String, var: String },
    #[error("{place}: unterminated ${{...}} in {value:?}")]
    BadReference { place: String, value: String },
    #[error("{place}: {value:?} is not an http(s) URL with a host: {reason}")]
    BadOrigin {
        place: String,
        value: String,
        reason: super::origin::OriginError,
    },
    #[error("{place}: {message}")]
    Invalid { place: String, message: String },
}

/// `taskhost.toml`, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub worker: WorkerSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginSection>,
    /// Overrides of tasks' declared defaults, by task name: `[tasks."tasks.evaluate_code"]`.
    #[serde(default)]
    pub tasks: BTreeMap<String, TaskSection>,
    /// Periodic tasks, by entry name: `[schedule."cleanup"]`.
    #[serde(default)]
    pub schedule: BTreeMap<String, super::schedule::ScheduleSection>,
    /// What a `--fleet` worker installs from `taskhost deploy`.
    #[serde(default)]
    pub fleet: FleetSection,
    /// Where traces go (OpenTelemetry's `OTEL_*` variables win over it).
    #[serde(default)]
    pub tracing: super::tracing::TracingSection,
}

/// `[fleet]`: which deploys a `--fleet` worker installs.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// Public keys (`ed25519:...`, from `taskhost keygen`) whose signed deploys are installed;
    /// with any, an unsigned deploy is refused.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// The plugin names the fleet may install (default: any).
    pub names: Option<Vec<String>>,
    /// The largest blob installed, MiB.
    pub max_blob_mb: Option<u64>,
    /// The oldest signed deploy record installed, as a duration ("30d"): an older one is
    /// refused, so even a worker that never saw a newer record refuses a replayed one.
    pub max_record_age: Option<toml::Value>,
}

/// The default largest deployed blob, MiB: room for a Python plugin (about 18 MB).
pub const DEFAULT_MAX_BLOB_MB: u64 = 64;

/// `[tasks."NAME"]`: how the task `NAME` is retried, over what its plugin declares.
#[derive(Debug, Default, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    pub max_retries: Option<u32>,
    /// Base of the exponential backoff, seconds.
    pub retry_backoff: Option<f64>,
    /// Ceiling of the backoff, seconds.
    pub retry_backoff_max: Option<f64>,
    /// Whether to randomise the backoff.
    pub retry_jitter: Option<bool>,
    /// Error kinds that retry the task instead of failing it.
    pub autoretry_for: Option<Vec<String>>,
    /// Starts allowed per worker, as Celery's `rate_limit`: `10/s`, `30/m`, `100/h`.
    pub rate_limit: Option<super::rate::Rate>,
    /// Starts allowed across every worker of the fleet, counted in Redis: `100/m`.
    pub fleet_rate_limit: Option<super::rate::Rate>,
}

/// `[worker]`: defaults for the `worker` command's flags (flags and Celery's environment
/// variables override them).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    pub broker_url: Option<String>,
    pub result_backend: Option<String>,
    /// kombu's options for a `sentinel://` broker (Celery's `broker_transport_options`).
    pub broker_transport_options: Option<TransportOptions>,
    /// The same for a `sentinel://` result backend (`result_backend_transport_options`).
    pub result_backend_transport_options: Option<TransportOptions>,
    pub concurrency: Option<usize>,
    /// Unstarted messages held per slot (Celery's `worker_prefetch_multiplier`).
    pub prefetch_multiplier: Option<usize>,
    pub queues: Option<Vec<String>>,
    pub plugins: Option<PathBuf>,
    pub hostname: Option<String>,
    /// Seconds a result is kept (Celery's `result_expires`); 0 keeps it forever.
    pub result_expires: Option<u64>,
    /// Seconds without a heartbeat after which a worker is taken for dead.
    pub heartbeat_lapse: Option<f64>,
    /// Returns from dead workers after which a message is dead-lettered.
    pub max_redeliveries: Option<u32>,
    /// Dead-letter entries kept; past it the oldest are dropped (and counted).
    pub dead_letter_max: Option<u64>,
    /// Replicas that must hold a batch's states before its messages are acknowledged (`WAIT`).
    pub wait_replicas: Option<u32>,
    /// Precompile cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Follow fleet deploys (`taskhost deploy`) published through the broker.
    pub fleet: Option<bool>,
    /// Send Celery's monitoring events from the start (as `-E`).
    pub task_events: Option<bool>,
    /// Address of the /metrics and /healthz endpoint, e.g. `127.0.0.1:9808`.
    pub metrics_addr: Option<String>,
}

/// The transport options a `sentinel://` URL needs, under kombu's names.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportOptions {
    /// The name the sentinels know the master by.
    pub master_name: Option<String>,
    /// Options for connecting to the sentinels themselves.
    pub sentinel_kwargs: Option<SentinelKwargs>,
}

/// kombu's `sentinel_kwargs`: the sentinels' own password (the URL's is the master's).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelKwargs {
    pub password: Option<String>,
}

impl TransportOptions {
    /// `url` with these options in its query, where it is a `sentinel://` URL that does not
    /// give them itself (the form the Redis client reads).
    pub fn applied_to(&self, url: &str) -> String {
        if !url.starts_with("sentinel://") {
            return url.to_owned();
        }
        let mut pairs = Vec::new();
        if let Some(name) = self
            .master_name
            .as_deref()
            .filter(|_| !url.contains("master_name="))
        {
            pairs.push(("master_name", name));
        }
        let password = self
            .sentinel_kwargs
            .as_ref()
            .and_then(|k| k.password.as_deref());
        if let Some(password) = password.filter(|_| !url.contains("sentinel_password=")) {
            pairs.push(("sentinel_password", password));
        }
        if pairs.is_empty() {
            return url.to_owned();
        }
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        let last = url.rsplit(';').next().unwrap_or(url);
        let joiner = if last.contains('?') { '&' } else { '?' };
        format!("{url}{joiner}{query}")
    }
}

/// `[limits]` and the limit keys of a `[plugins.NAME]` section. Unset keys of a plugin take the
/// `[limits]` value, unset `[limits]` keys the defaults (see [`Limits::default`]).
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Linear memory per instance, MiB.
    pub memory_mb: Option<u64>,
    /// Table elements per table of an instance.
    pub table_elements: Option<u32>,
    /// Hard time limit, seconds: the run is interrupted.
    pub time_limit: Option<f64>,
    /// Soft time limit, seconds: the task is told its deadline.
    pub soft_time_limit: Option<f64>,
    /// Largest result a task may return, MiB.
    pub result_mb: Option<u64>,
    /// Instances of this plugin that may run at once; more wait their turn.
    pub max_instances: Option<u32>,
    /// Tasks one instance serves before it is discarded (1: a fresh instance per task).
    pub reuse_instances: Option<u32>,
    /// WebAssembly stack, KiB. Worker-wide: only in `[limits]`.
    pub stack_kb: Option<u64>,
    /// What one component may hold of the instance pool: core module instances, linear
    /// memories, tables. Worker-wide: only in `[limits]`.
    pub component_core_instances: Option<u32>,
    pub component_memories: Option<u32>,
    pub component_tables: Option<u32>,
}

/// What one component may take of the shared instance pool; the pool holds this much for each
/// slot, so no plugin's instance can take another's share. A component that needs more is
/// refused when it loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ComponentCaps {
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
}

impl Default for ComponentCaps {
    fn default() -> Self {
        Self {
            core_instances: 16,
            memories: 2,
            tables: 4,
        }
    }
}

/// `[plugins.NAME]`: what one plugin is granted.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSection {
    /// Origins (`scheme://host:port`, a path is ignored) the plugin may send HTTP requests to.
    #[serde(default)]
    pub allow_http: Vec<String>,
    /// Values the plugin reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Task names the plugin may send besides its own: exact, `prefix.*`, or `*`.
    #[serde(default)]
    pub allow_send: Vec<String>,
    /// Queues what the plugin sends may go to, by exact name. None: the queues the worker
    /// consumes.
    pub send_queues: Option<Vec<String>>,
    /// Whether a granted host name may resolve to a loopback, private or link-local address
    /// (a grant naming such an address needs no opt-in).
    #[serde(default)]
    pub allow_private_network: bool,
    /// Task names the plugin may serve: exact, `prefix.*`, or `*`. None: names starting with
    /// the plugin's own name and a dot.
    pub tasks: Option<Vec<String>>,
    #[serde(flatten)]
    pub limits: LimitsSection,
}

/// The default memory limit of an instance, MiB.
pub const DEFAULT_MEMORY_MB: u64 = 128;
/// The default table size limit, elements.
pub const DEFAULT_TABLE_ELEMENTS: u32 = 20_000;
/// The default hard time limit, seconds: a backstop, so a stuck plugin cannot hold a slot
/// forever (Celery has none by default; set `time_limit` to lift or tighten it).
pub const DEFAULT_TIME_LIMIT_S: u64 = 3600;
/// The default result size limit, MiB.
pub const DEFAULT_RESULT_MB: u64 = 16;
/// The default WebAssembly stack, KiB (wasmtime's default).
pub const DEFAULT_STACK_KB: u64 = 512;

impl FileConfig {
    /// Reads `path`, or `./taskhost.toml` if no path is given and that file exists, or the
    /// empty configuration. Returns the path actually read.
    pub fn load(path: Option<&Path>) -> Result<(Self, Option<PathBuf>), ConfigError> {
        let path = match path {
            Some(p) => p.to_path_buf(),
            None => {
                let implicit = PathBuf::from("taskhost.toml");
                if !implicit.is_file() {
                    return Ok((Self::default(), None));
                }
                implicit
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Self::parse(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok((config, Some(path)))
    }

    /// Parses the text of a config file.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`], with TOML's message on one line.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Syntax(e.to_string().trim().replace('\n', " ")))
    }

    /// The `[schedule."NAME"]` entries, checked.
    pub fn schedule(&self) -> Result<Vec<super::schedule::Entry>, ConfigError> {
        self.schedule
            .iter()
            .map(|(name, section)| {
                section
                    .check(name)
                    .map_err(|e| ConfigError::Syntax(e.to_string()))
            })
            .collect()
    }

    /// The `[tasks."NAME"]` sections, checked.
    pub fn task_overrides(
        &self,
    ) -> Result<std::collections::HashMap<String, TaskSection>, ConfigError> {
        for (name, task) in &self.tasks {
            for (key, value) in [
                ("retry_backoff", task.retry_backoff),
                ("retry_backoff_max", task.retry_backoff_max),
            ] {
                if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                    return Err(ConfigError::Invalid {
                        place: format!("[tasks.{name:?}]"),
                        message: format!("{key} must be a number of seconds, 0 or more"),
                    });
                }
            }
        }
        Ok(self.tasks.clone().into_iter().collect())
    }

    /// What one component may take of the instance pool (`[limits] component_*`).
    pub fn component_caps(&self) -> Result<ComponentCaps, ConfigError> {
        let base = ComponentCaps::default();
        let limits = &self.limits;
        let cap = |key: &str, v: Option<u32>, default: u32| match v {
            Some(n) if !(1..=1000).contains(&n) => Err(ConfigError::Invalid {
                place: "[limits]".into(),
                message: format!("{key} must be between 1 and 1000, got {n}"),
            }),
            v => Ok(v.unwrap_or(default)),
        };
        Ok(ComponentCaps {
            core_instances: cap(
                "component_core_instances",
                limits.component_core_instances,
                base.core_instances,
            )?,
            memories: cap(
                "component_memories",
                limits.component_memories,
                base.memories,
            )?,
            tables: cap("component_tables", limits.component_tables, base.tables)?,
        })
    }

    /// The WebAssembly stack every instance gets, bytes.
    pub fn stack_bytes(&self) -> Result<usize, ConfigError> {
        match self.limits.stack_kb {
            Some(kb) if !(64..=65_536).contains(&kb) => Err(ConfigError::Invalid {
                place: "[limits]".into(),
                message: format!("stack_kb must be between 64 and 65536, got {kb}"),
            }),
            kb => Ok(usize::try_from(kb.unwrap_or(DEFAULT_STACK_KB) * 1024).unwrap_or(usize::MAX)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(var: &str) -> Option<String> {
        (var == "EXECUTOR_SERVICE_URL").then(|| "http://Exec.local:8001/api".to_owned())
    }

    #[test]
    fn refuses_bad_config_with_the_place() {
        let err = FileConfig::parse("[plugins.x]\nallow_htp = []")
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("allow_htp"), "{err}");
        let err = FileConfig::parse("[tasks.\"t\"]\nrate_limit = \"10/d\"")
            .expect_err("bad rate")
            .to_string();
        assert!(err.contains("invalid rate limit \"10/d\""), "{err}");
        let config = FileConfig::parse("[plugins.x]\nallow_http = [\"${NOPE}\"]").expect("parses");
        let err = config.grants(&env).expect_err("missing env").to_string();
        assert!(err.contains("NOPE") && err.contains("[plugins.x]"), "{err}");
        let config = FileConfig::parse("[plugins.x]\nallow_http = [\"ftp://h\"]").expect("parses");
        assert!(config.grants(&env).is_err());
        let config = FileConfig::parse("[plugins.x]\ntime_limit = -1").expect("parses");
        assert!(config.grants(&env).is_err());
    }

    #[test]
    fn kombus_transport_options_reach_a_sentinel_url_and_only_one() {
        let config = FileConfig::parse(
            "[worker]\nbroker_transport_options = { master_name = \"mymaster\", \
             sentinel_kwargs = { password = \"s&cret\" } }",
        )
        .expect("parses");
        let options = config.worker.broker_transport_options.expect("options");
        assert_eq!(
            options.applied_to("sentinel://h1:26379;sentinel://h2:26379/0"),
            "sentinel://h1:26379;sentinel://h2:26379/0?master_name=mymaster&sentinel_password=s%26cret"
        );
        assert_eq!(options.applied_to("redis://h:1/0"), "redis://h:1/0");
    }
}
